"""The ingester's parts (cache/ingest/), each on its own: rules its seams make testable."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from cache.ingest import IngestConfig, Ingester, NoLock, PollResult, batch, eventwire
from cache.ingest.eventwire import id_ranges, split_event_type, subject_of
from cache.ingest.sgclock import SGClock
from cache.replica import fetchqueue
from cache.replica.schema import Schema, parse_rules
from cache.replica.statekeys import EVENT_CURSOR, SG_CLOCK
from cache.replica.store import Store

from .fakesg import FakeSite
from .paths import REPO

RULES = REPO / "schema" / "basic-filters.txt"


class NoEvents:
    """An SG client with no events, no rows and the schema the replica has."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def find(self, entity_type: str, filters: Any, fields: list[str] | None = None, **kwargs: Any) -> list[Any]:
        self.calls.append((entity_type, filters))
        return []

    def schema_read(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def store(db_url: str, site: FakeSite) -> Iterator[Store]:
    schema = Schema.from_schema_read(site.schema).brief().filtered(parse_rules(RULES.read_text()))
    st = Store.open(db_url, schema)
    with st.engine.begin() as conn:
        st.set_state(conn, EVENT_CURSOR, 0)
    yield st
    st.dispose()


def test_subject_of() -> None:
    shot = {"type": "Shot", "id": 4}
    assert subject_of({"event_type": "Shotgun_Shot_Change", "entity": shot}) == ("Shot", 4)
    assert subject_of({"event_type": "Shotgun_Shot_Retirement", "entity": None, "meta": {"entity_id": 4}}) \
        == ("Shot", 4)
    # a backref names the other side of a pair: no subject of its own
    assert subject_of({"event_type": "Shotgun_Shot_Change", "entity": {"type": "Task", "id": 1},
                       "meta": {"actual_attribute_changed": "Task.entity", "entity_id": 4}}) is None
    assert subject_of({"event_type": "Shotgun_DisplayColumn_New", "entity": shot}) is None
    assert subject_of({"event_type": "Toolkit_App_Startup", "entity": shot}) is None
    assert split_event_type("Shotgun_CustomEntity01_Change") == ("CustomEntity01", "Change")
    assert id_ranges([7, 1, 2, 3, 9, 10]) == "1-3,7,9-10"


def test_a_poll_finds_each_events_subject_once(site: FakeSite, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch computes an event's subject once and passes it to the loads and the apply."""
    proj = site.create_direct("Project", {"name": "p"})
    assets = [site.create_direct("Asset", {"code": f"a{i}", "project": proj}) for i in range(2)]
    shot = site.create_direct("Shot", {"code": "sh010", "project": proj, "assets": assets[:1]})
    site.update_direct("Shot", shot["id"], {"code": "sh011", "assets": [assets[1]]})
    site.delete_direct("Asset", assets[0]["id"])
    events = site.events(0)
    calls: list[Any] = []

    def counted(event: Any) -> Any:
        calls.append(event["id"])
        return eventwire.subject_of(event)

    for module in ("cache.ingest.batch", "cache.ingest.apply"):
        monkeypatch.setattr(f"{module}.subject_of", counted)
    ingester = Ingester(store, None, IngestConfig(), lock=NoLock())
    try:
        with store.engine.begin() as conn:
            ingester.apply_batch(conn, events, {}, 0, PollResult())
            assert sorted(calls) == sorted(e["id"] for e in events)
            assert batch.stored_ids(store, conn, [e["id"] for e in events]) == {e["id"] for e in events}
    finally:
        ingester.close()


def test_a_queued_entity_of_a_type_no_longer_cached_is_dropped(store: Store) -> None:
    """The schema file lost a type while entities of it were queued: the fetch drops them and the
    ingester goes on polling (the drop commits; the connection is left without a transaction)."""
    with store.engine.begin() as conn:
        fetchqueue.put(conn, store.fetch_queue, {("Gone", 1): "new", ("Shot", 5): "new"}, dt.datetime(2026, 1, 1))
    sg = NoEvents()
    ingester = Ingester(store, sg, IngestConfig(), lock=NoLock())
    try:
        assert ingester.process_fetch_queue() == 2
        assert not ingester.conn.in_transaction()  # type: ignore[union-attr]
        assert ingester.poll_once().received == 0
        with store.engine.connect() as conn:
            assert fetchqueue.is_empty(conn, store.fetch_queue)  # Shot 5: not found at SG, dropped too
    finally:
        ingester.close()


def test_sg_clock_runs_from_the_newest_created_at_by_local_elapsed_time(store: Store) -> None:
    local = [dt.datetime(2030, 1, 1, 0, 0, 0)]
    clock = SGClock(store, lambda: local[0])
    assert clock.now() == local[0]  # nothing seen: the local clock stands in
    with store.engine.begin() as conn:
        clock.see(conn, [{"created_at": "2026-03-01T09:00:00Z"}, {"created_at": None}])
        local[0] += dt.timedelta(seconds=30)
        assert clock.now() == dt.datetime(2026, 3, 1, 9, 0, 30)
        clock.see(conn, [{"created_at": "2026-03-01T09:00:10Z"}])  # older than SG's estimated now
        assert clock.now() == dt.datetime(2026, 3, 1, 9, 0, 30)
        assert store.get_state(conn, SG_CLOCK) == "2026-03-01T09:00:10Z"
    restarted = SGClock(store, lambda: local[0])
    with store.engine.begin() as conn:
        restarted.load(conn)
    assert restarted.now() == dt.datetime(2026, 3, 1, 9, 0, 10)


def test_the_ingesters_local_clock_is_not_moved_by_a_step_of_the_wall_clock(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wall clock stepped an hour forward (NTP, an operator) while a gap waits must not age the
    gap by an hour: the ingester measures elapsed time with the monotonic clock."""
    import time

    import cache.ingest.sgclock as sgclock

    mono = [1000.0]
    wall = [dt.datetime(2026, 3, 1, 9, 0, 0)]
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    monkeypatch.setattr(sgclock, "now_utc", lambda: wall[0])
    ingester = Ingester(store, None, IngestConfig(), lock=NoLock())
    try:
        with store.engine.begin() as conn:
            ingester.sg_clock.see(conn, [{"created_at": "2026-03-01T09:00:00Z"}])
        wall[0] += dt.timedelta(hours=1)  # the step
        mono[0] += 5
        assert ingester.sg_now() == dt.datetime(2026, 3, 1, 9, 0, 5)
    finally:
        ingester.close()
