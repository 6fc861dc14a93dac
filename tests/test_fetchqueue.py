"""The fetch queue's API (cache/replica/fetchqueue.py) on ``db_url``: the only SQL against ``sgcache_fetch``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from cache.replica import fetchqueue
from cache.replica.schema import Schema
from cache.replica.store import Store

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    st = Store.open(db_url, Schema.from_dict({"entities": {"Shot": {"fields": {"code": "text"}}}}))
    yield st
    st.dispose()


def reasons(store: Store) -> dict[tuple[str, int], str]:
    q = store.fetch_queue
    with store.engine.connect() as conn:
        return {(r.entity_type, r.entity_id): r.reason for r in conn.execute(q.select())}


def test_put_queues_and_queuing_again_takes_the_new_reason_and_time(store: Store) -> None:
    q = store.fetch_queue
    with store.engine.begin() as conn:
        assert fetchqueue.is_empty(conn, q)
        fetchqueue.put(conn, q, {("Shot", 2): "new", ("Asset", 1): "revival"}, T0)
        fetchqueue.put(conn, q, {("Shot", 2): "late event"}, T0 + dt.timedelta(seconds=5))
        fetchqueue.put(conn, q, {}, T0)  # nothing to queue: no statement
        assert not fetchqueue.is_empty(conn, q)
        assert fetchqueue.entries(conn, q, 10) == {"Asset": {1: T0}, "Shot": {2: T0 + dt.timedelta(seconds=5)}}
    assert reasons(store) == {("Asset", 1): "revival", ("Shot", 2): "late event"}


def test_entries_come_up_to_the_limit_of_each_type_the_longest_queued_first(store: Store) -> None:
    q = store.fetch_queue
    later = T0 + dt.timedelta(seconds=1)
    with store.engine.begin() as conn:
        fetchqueue.put(conn, q, {("Shot", 9): "a", ("Shot", 3): "b", ("Asset", 7): "c", ("Task", 1): "d"}, T0)
        fetchqueue.put(conn, q, {("Shot", 1): "e"}, later)
        assert fetchqueue.entries(conn, q, 2) == {"Asset": {7: T0}, "Shot": {3: T0, 9: T0}, "Task": {1: T0}}
        fetchqueue.requeue(conn, q, "Shot", [3, 9], "not stored", later + dt.timedelta(seconds=1))
        assert list(fetchqueue.entries(conn, q, 2)["Shot"]) == [1, 3]  # the requeued ones at the back
        assert fetchqueue.queued_types(conn, q) == {"Asset", "Shot", "Task"}


def test_remove_handled_keeps_an_entity_queued_again_since_the_read(store: Store) -> None:
    """A fetch read the queue, then a poll queued Shot 2 again (a newer change): removing what the
    fetch handled must keep Shot 2 queued, or that change would never be fetched."""
    q = store.fetch_queue
    with store.engine.begin() as conn:
        fetchqueue.put(conn, q, {("Shot", 1): "new", ("Shot", 2): "new", ("Asset", 5): "new"}, T0)
        read = fetchqueue.entries(conn, q, 100)
    with store.engine.begin() as conn:
        fetchqueue.put(conn, q, {("Shot", 2): "late event"}, T0 + dt.timedelta(seconds=1))
    with store.engine.begin() as conn:
        fetchqueue.remove_handled(conn, q, "Shot", read["Shot"])
        fetchqueue.remove_handled(conn, q, "Shot", {})  # nothing handled: nothing removed
        assert fetchqueue.entries(conn, q, 100) == {"Asset": {5: T0}, "Shot": {2: T0 + dt.timedelta(seconds=1)}}
        assert fetchqueue.queued_types(conn, q) == {"Asset", "Shot"}


def test_remove_handled_removes_more_ids_than_one_statement_takes(store: Store) -> None:
    q = store.fetch_queue
    many = {("Shot", i): "new" for i in range(1, 1201)}
    with store.engine.begin() as conn:
        fetchqueue.put(conn, q, many, T0)
        read = fetchqueue.entries(conn, q, 5000)
        assert len(read["Shot"]) == 1200
        fetchqueue.remove_handled(conn, q, "Shot", read["Shot"])
        assert fetchqueue.is_empty(conn, q)


def test_remove_drops_entities_whenever_they_were_queued(store: Store) -> None:
    q = store.fetch_queue
    with store.engine.begin() as conn:
        fetchqueue.put(conn, q, {("Shot", 1): "new", ("Shot", 2): "new"}, T0)
        fetchqueue.put(conn, q, {("Shot", 2): "late event"}, T0 + dt.timedelta(seconds=1))
        fetchqueue.remove(conn, q, [("Shot", 2), ("Shot", 3)])  # 3 was never queued
        fetchqueue.remove(conn, q, [])
        assert fetchqueue.entries(conn, q, 10) == {"Shot": {1: T0}}


def test_write_batch_queues_and_unqueues_through_the_api(store: Store) -> None:
    """WriteBatch.queue/unqueue (the one write path) flush into the same table."""
    with store.engine.begin() as conn:
        batch = store.batch(conn)
        batch.queue(("Shot", 4), "unknown row")
        batch.queue(("Nope", 1), "not in the schema: never queued")
        batch.flush()
    assert reasons(store) == {("Shot", 4): "unknown row"}
    with store.engine.begin() as conn:
        batch = store.batch(conn)
        batch.unqueue([("Shot", 4)])
        batch.flush()
        assert fetchqueue.is_empty(conn, store.fetch_queue)


def test_an_entity_queued_again_by_a_host_whose_clock_is_behind_is_kept(store: Store,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingester read the queue, then a proxy on another host, its clock two minutes behind,
    queued Shot 2 again (a partial write answer): the entries are stamped with the database's
    clock, so the re-queue is later than the read and survives the removal of what the fetch
    handled. Stamped with the proxy host's clock it looked older and was dropped unfetched."""
    with store.engine.begin() as conn:
        batch = store.batch(conn)
        batch.queue(("Shot", 1), "new")
        batch.queue(("Shot", 2), "new")
        batch.flush()
    with store.engine.begin() as conn:
        read = fetchqueue.entries(conn, store.fetch_queue, 100)
    behind = lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=2)  # noqa: E731
    monkeypatch.setattr(store, "now", behind)  # the proxy host's own clock
    with store.engine.begin() as conn:
        batch = store.batch(conn, "proxy")
        batch.queue(("Shot", 2), "partial answer")
        batch.flush()
    with store.engine.begin() as conn:
        fetchqueue.remove_handled(conn, store.fetch_queue, "Shot", read["Shot"])
    assert reasons(store) == {("Shot", 2): "partial answer"}
