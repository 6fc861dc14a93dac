"""Reads answered on the event loop (cache/proxy/inline.py): only fast, known reads on a connection
that never waits, the same answers and pass reasons as a worker's, and a worker whenever unsure."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa

from cache.errors import Passthrough
from cache.ops import access
from cache.proxy import inline
from cache.proxy import service as servicemod
from cache.proxy.inline import NotInline
from cache.proxy.reads import Reads, _encoded, read_encoded
from cache.proxy.service import CacheService
from cache.read import reader
from cache.replica import pending
from cache.replica.schema import Schema
from cache.replica.store import Store

from .paths import BASIC_SCHEMA

SMALL = {"type": "Shot", "return_fields": ["code"], "return_only": "active",
         "filters": {"logical_operator": "and", "conditions": [{"path": "id", "relation": "is", "values": [7]}]},
         "paging": {"entities_per_page": 50, "current_page": 1}, "return_paging_info": False}


@pytest.fixture
def service(db_url: str) -> Iterator[CacheService]:
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    blank = dict.fromkeys(store.schema.entities["Shot"].fields)
    with store.engine.begin() as conn:
        store.write_entities(conn, "Shot", [{**blank, "id": i, "code": f"sh{i:03d}"} for i in range(1, 21)],
                             "scan", complete=True)
        store.mark_primed(conn, "Shot")
    store.dispose()
    svc = CacheService(db_url, BASIC_SCHEMA, max_lag=0)
    yield svc
    svc.close()


@pytest.fixture
def generous(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read counts as fast, the inline budget is ample and the replica's state stays fresh a
    minute: no test depends on a busy machine's speed."""
    monkeypatch.setattr(reader, "FAST_READ_SECONDS", 60.0)
    monkeypatch.setattr(inline, "INLINE_BUDGET_SECONDS", 60.0)
    monkeypatch.setattr(servicemod, "REPLICA_STATE_TTL", 60.0)


def inline_read(service: CacheService, args: Any = SMALL) -> Any:
    """The ``results`` of a read answered inline (NotInline when it goes to a worker)."""
    return json.loads(service.inline.answer(service, args, False, _encoded)[0])["results"]


def test_only_a_read_seen_fast_runs_inline_with_the_workers_answer(service: CacheService, generous: None) -> None:
    with pytest.raises(NotInline):  # never run yet: a worker reads it (and refreshes the replica state)
        inline_read(service)
    expected = service.read(SMALL)
    assert [e["code"] for e in expected["entities"]] == ["sh007"]
    if service.inline.engine is None:  # PostgreSQL: the network may wait, every read goes to a worker
        assert service.store.dialect.name == "postgresql"
        with pytest.raises(NotInline):
            inline_read(service)
        return
    assert inline_read(service) == expected
    service.invalidate()  # the replica state is no longer known fresh: a worker refreshes it
    with pytest.raises(NotInline):
        inline_read(service)


def test_a_marker_committed_by_this_proxy_is_seen_by_its_next_inline_read(service: CacheService,
                                                                         generous: None) -> None:
    service.read(SMALL)
    if service.inline.engine is None:
        pytest.skip("no inline reads on PostgreSQL")
    inline_read(service)
    with service.store.write_engine.begin() as conn:
        pending.mark(conn, service.store.pending, [("Shot", "code")])
    with pytest.raises(Passthrough) as info:  # the kept answer is not reused: a marker was committed
        inline_read(service)
    assert info.value.reason == "pending-write"


def test_a_kept_answer_is_reused_until_anything_is_committed(service: CacheService, generous: None) -> None:
    if service.inline.engine is None:
        pytest.skip("no inline reads on PostgreSQL")
    service.read(SMALL)
    assert [e["code"] for e in inline_read(service)["entities"]] == ["sh007"]
    assert len(service.inline.answers) == 1
    service.reader._fast.clear()  # no read is fast now: only a kept answer is inline
    assert [e["code"] for e in inline_read(service)["entities"]] == ["sh007"]
    store = service.store
    blank = dict.fromkeys(store.schema.entities["Shot"].fields)
    with store.write_engine.begin() as conn:  # another connection commits (the ingester, a scan, a write)
        store.write_entities(conn, "Shot", [{**blank, "id": 7, "code": "renamed"}], "scan", complete=True)
    with pytest.raises(NotInline):  # changed since: not reused, and not fast: a worker reads it
        inline_read(service)
    assert len(service.inline.answers) == 0
    assert [e["code"] for e in service.read(SMALL)["entities"]] == ["renamed"]
    assert [e["code"] for e in inline_read(service)["entities"]] == ["renamed"]  # fast again


def test_the_versions_connection_is_held_until_it_fails_or_closes(service: CacheService, generous: None) -> None:
    """SQLite: the one connection that asks ``data_version`` stays checked out between questions
    (a checkout per hit cost more than the question); a failure gives it back and forgets the kept
    answers, so a kept answer is never given on a version asked through a connection in doubt."""
    if service.inline.engine is None:
        pytest.skip("no inline reads on PostgreSQL")
    checkouts: list[int] = []
    sa.event.listen(service.inline.versions, "checkout", lambda *_: checkouts.append(1))
    service.read(SMALL)
    for _ in range(5):
        assert [e["code"] for e in inline_read(service)["entities"]] == ["sh007"]
    assert len(checkouts) <= 1 and service.inline.versions.pool.checkedout() == 1
    held = service.inline._versions_conn
    assert held is not None and not held.in_transaction()  # never holds a read snapshot open

    def broken(_conn: Any) -> Any:
        raise RuntimeError("the connection broke")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service.store.dialect, "data_version", broken)
        with pytest.raises(NotInline):  # a worker reads it (and says why it passes, if it does)
            inline_read(service)
        assert service.inline.version_now(service) is None  # a worker's question fails the same way
    assert len(service.inline.answers) == 0 and service.inline._versions_conn is None
    assert service.inline.versions.pool.checkedout() == 0
    checkouts.clear()
    service.reader._fast.clear()  # only a kept answer could be inline now: there is none
    with pytest.raises(NotInline):
        inline_read(service)
    assert len(checkouts) == 1  # asked again on a connection checked out anew
    service.inline.close()
    assert service.inline._versions_conn is None and service.inline.versions.pool.checkedout() == 0


def attempts(service: CacheService) -> int:
    """How often a worker's read may be tried before its answer must be kept and given: once on
    SQLite; on PostgreSQL the version is the whole cluster's snapshot, which other tests' transactions
    (another test process on the same server) move at any moment."""
    return 1 if service.store.dialect.name == "sqlite" else 50


def read_until_kept(service: CacheService) -> tuple[bytes, int | None]:
    for _ in range(attempts(service)):
        encoded = read_encoded(service, SMALL, False)
        if len(service.inline.answers) == 1:
            return encoded
    raise AssertionError("a worker's answer was never kept")


def test_a_workers_answer_is_kept_when_nothing_changed_while_it_was_read(service: CacheService,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite a kept answer is given on the event loop; on PostgreSQL (no reads on the loop) by
    the worker, which asks the snapshot instead of reading; on both, not after anything committed."""
    monkeypatch.setattr(reader, "FAST_READ_SECONDS", 0.0)  # never fast: only a kept answer can be inline
    body, rows = read_until_kept(service)
    if service.inline.engine is not None:
        assert service.inline.answer(service, SMALL, False, _encoded) == (body, rows)
    reads_made: list[int] = []
    real_read = service.read
    monkeypatch.setattr(service, "read", lambda *a, **kw: reads_made.append(1) or real_read(*a, **kw))
    for _ in range(attempts(service)):
        reads_made.clear()
        given = read_encoded(service, SMALL, False)
        if not reads_made:
            break
    assert given == (body, rows)
    assert reads_made == []  # given without reading
    store = service.store
    blank = dict.fromkeys(store.schema.entities["Shot"].fields)
    with store.write_engine.begin() as conn:  # another connection commits (the ingester, a scan, a write)
        store.write_entities(conn, "Shot", [{**blank, "id": 7, "code": "renamed"}], "scan", complete=True)
    renamed, _ = read_encoded(service, SMALL, False)
    assert [e["code"] for e in json.loads(renamed)["results"]["entities"]] == ["renamed"]
    assert reads_made == [1]


def test_postgresql_gives_a_kept_answer_on_the_event_loop_until_anything_is_committed(
        service: CacheService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot is asked on the loop (cache/proxy/loopversions.py): a kept answer takes no worker;
    after another connection commits, the read goes to a worker with the version it saw."""
    if service.inline.loop_versions is None:
        pytest.skip("versions are asked on the event loop on PostgreSQL only")
    monkeypatch.setattr(reader, "FAST_READ_SECONDS", 0.0)
    store = service.store
    blank = dict.fromkeys(store.schema.entities["Shot"].fields)

    async def on_loop() -> tuple[bytes, int | None] | NotInline:
        try:
            return await service.inline.kept_on_loop(service, SMALL, False)
        except NotInline as exc:
            return exc

    try:
        for _ in range(attempts(service)):
            body, rows = read_until_kept(service)
            given = asyncio.run(on_loop())
            if given == (body, rows):
                break
        assert given == (body, rows)
        with store.write_engine.begin() as conn:
            store.write_entities(conn, "Shot", [{**blank, "id": 7, "code": "renamed"}], "scan", complete=True)
        missed = asyncio.run(on_loop())
        assert isinstance(missed, NotInline) and missed.key is not None and missed.version is not None
        renamed, _ = read_encoded(service, SMALL, False, key=missed.key, version=missed.version)
        assert [e["code"] for e in json.loads(renamed)["results"]["entities"]] == ["renamed"]
    finally:
        service.inline.loop_versions.close()  # (each asyncio.run is a new loop: start afresh)


def test_a_kept_answer_is_not_given_while_the_replica_is_stale(service: CacheService,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks that are not in the database run before a kept answer is given, in a worker too."""
    monkeypatch.setattr(reader, "FAST_READ_SECONDS", 0.0)
    read_until_kept(service)
    service.max_lag = 1.0  # no ingester heartbeat: stale from now on
    with pytest.raises(Passthrough) as info:
        read_encoded(service, SMALL, False)
    assert info.value.reason == "stale"
    assert read_encoded(service, SMALL, True)  # SG down (offline): the replica's answer, stale


def test_a_read_over_the_inline_budget_goes_to_a_worker_with_the_whole_budget(
        service: CacheService, generous: None, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = service.read(SMALL)
    if service.inline.engine is None:
        pytest.skip("no inline reads on PostgreSQL")
    monkeypatch.setattr(inline, "INLINE_BUDGET_SECONDS", 0.0)
    with pytest.raises(NotInline):
        inline_read(service)
    # not remembered as slow: the worker answers it (and it is fast again for the next one)
    assert service.read(SMALL, budget=1.0) == expected


def test_a_read_that_was_not_fast_goes_to_a_worker(service: CacheService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "FAST_READ_SECONDS", 0.0)
    service.read(SMALL)
    with pytest.raises(NotInline):
        inline_read(service)


def test_the_inline_connection_never_waits_for_a_lock(service: CacheService) -> None:
    if service.inline.engine is None:
        pytest.skip("no inline reads on PostgreSQL")
    with service.inline.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 0
    with service.store.engine.connect() as conn:  # the workers' connections still wait
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_reads_answer_the_same_hit_from_a_worker_then_inline(service: CacheService, generous: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    answered = []

    def read(*a: Any) -> Any:
        result = inline.InlineReads.answer(service.inline, *a)
        answered.append(1)
        return result

    monkeypatch.setattr(service.inline, "answer", read)

    async def twice() -> list[Any]:
        with ThreadPoolExecutor(2) as pool:
            reads = Reads(pool)
            return [await reads.answer(service, SMALL, "client-1") for _ in range(2)]

    first, second = asyncio.run(twice())
    assert not isinstance(first, str) and not isinstance(second, str)
    assert first.body == second.body and first.rows == second.rows == 1
    assert first.headers == second.headers
    # the first went to a worker (never seen yet), the second was answered on the loop (SQLite)
    assert len(answered) == (0 if service.inline.engine is None else 1)


def test_access_lines_skip_mitmproxys_legacy_log_event() -> None:
    class LegacyLogEvents(logging.Handler):  # mitmproxy's handler, by name
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.seen.append(record.name)

    handler = LegacyLogEvents()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        access.quiet_connections(True)
        for name in ("sgcache.access", "sgcache"):
            root.handle(logging.LogRecord(name, logging.INFO, __file__, 1, "line", None, None))
        access.quiet_connections(False)
        root.handle(logging.LogRecord("sgcache.access", logging.INFO, __file__, 1, "line", None, None))
    finally:
        root.removeHandler(handler)
    assert handler.seen == ["sgcache", "sgcache.access"]


def test_identical_reads_arriving_together_take_one_workers_answer(service: CacheService,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Many clients asking the same thing once every kept answer is old: one worker reads it (on
    PostgreSQL, when no other session moved the snapshot meanwhile: tried again until so)."""
    monkeypatch.setattr(reader, "FAST_READ_SECONDS", 0.0)  # never inline: only a kept answer is
    service.read(SMALL)  # the replica state is known fresh
    reads_made = []
    real_read = service.read

    def counted(*a: Any, **kw: Any) -> Any:
        reads_made.append(1)
        return real_read(*a, **kw)

    monkeypatch.setattr(service, "read", counted)

    async def together() -> list[Any]:
        with ThreadPoolExecutor(4) as pool:
            reads = Reads(pool)
            return await asyncio.gather(*(reads.answer(service, SMALL, f"client-{n}") for n in range(8)))

    for _ in range(attempts(service)):
        service.inline.answers.clear()
        reads_made.clear()
        answers = asyncio.run(together())
        assert all(not isinstance(a, str) and a.body == answers[0].body for a in answers)
        assert [e["code"] for e in json.loads(answers[0].body)["results"]["entities"]] == ["sh007"]
        if len(reads_made) == 1:
            break
    assert len(reads_made) == 1


def test_a_read_arriving_after_a_commit_never_takes_the_answer_read_before_it(service: CacheService,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The first read's answer is kept as of the version it saw; a read that arrives while it is
    still on its way back, but after a commit (its client's write), reads for itself."""
    import threading

    from cache.proxy import reads as reads_module

    monkeypatch.setattr(reader, "FAST_READ_SECONDS", 0.0)
    service.read(SMALL)
    committed, release = threading.Event(), threading.Event()
    calls = []
    real = reads_module.read_encoded

    def first_then_commit(*a: Any) -> Any:
        answer = real(*a)
        calls.append(1)
        if len(calls) == 1:  # kept as of the old version; then another connection commits
            store = service.store
            blank = dict.fromkeys(store.schema.entities["Shot"].fields)
            with store.write_engine.begin() as conn:
                store.write_entities(conn, "Shot", [{**blank, "id": 7, "code": "renamed"}], "proxy", complete=True)
            committed.set()
            release.wait(10)
        return answer

    monkeypatch.setattr(reads_module, "read_encoded", first_then_commit)

    async def race() -> list[Any]:
        with ThreadPoolExecutor(4) as pool:
            reads = Reads(pool)
            loop = asyncio.get_running_loop()
            first = asyncio.ensure_future(reads.answer(service, SMALL, "client-1"))
            await loop.run_in_executor(None, committed.wait, 10)
            second = asyncio.ensure_future(reads.answer(service, SMALL, "client-2"))
            for _ in range(20):  # the second is now waiting for the first one's read
                await asyncio.sleep(0)
            release.set()
            return [await first, await second]

    first, second = asyncio.run(race())
    assert [e["code"] for e in json.loads(first.body)["results"]["entities"]] == ["sh007"]
    assert [e["code"] for e in json.loads(second.body)["results"]["entities"]] == ["renamed"]
    assert len(calls) == 2
