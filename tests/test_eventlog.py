"""EventLogEntry as a cached type (ingester in-process, the fake SG without HTTP, replica on ``db_url``):
every applied event becomes a row, and reads of events are answered only below the event cursor."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from cache.errors import Passthrough
from cache.ingest import IngestConfig, Ingester
from cache.read import Reader, ReplicaState
from cache.read.eventlog import check_answer, check_given_up, check_read, id_lower_bound, id_upper_bound
from cache.replica.schema import Schema, parse_rules
from cache.replica.statekeys import EVENT_CURSOR as K_CURSOR
from cache.replica.store import Store
from cache.scan.scanner import Scanner

from .fakesg import FakeSite
from .paths import RULES
from .replica import SiteClient, make_project, state, sync

EVENT_FIELDS = ["event_type", "attribute_name", "meta", "entity", "project", "user", "session_uuid",
                "description", "created_at"]


def with_events_schema(site: FakeSite) -> Schema:
    rules = RULES.read_text() + "\n+EventLogEntry.*\n"
    return Schema.from_schema_read(site.schema).brief().filtered(parse_rules(rules))


def conds(*conditions: Any, op: str = "and") -> dict[str, Any]:
    return {"logical_operator": op, "conditions": list(conditions)}


def cond(relation: str, *values: Any, path: str = "id") -> dict[str, Any]:
    return {"path": path, "relation": relation, "values": list(values)}


# -- the rule, without a database -----------------------------------------------------
def test_id_upper_bound() -> None:
    assert id_upper_bound(conds()) is None
    assert id_upper_bound(conds(cond("less_than", 10))) == 9
    assert id_upper_bound(conds(cond("is", 7), cond("less_than", 100))) == 7
    assert id_upper_bound(conds(cond("in", 3, 12, 5))) == 12
    assert id_upper_bound(conds(cond("between", 2, 8))) == 8
    assert id_upper_bound(conds(cond("greater_than", 8))) is None
    assert id_upper_bound(conds(cond("less_than", 10), op="or")) is None  # an "or" bounds nothing
    assert id_upper_bound(conds(conds(cond("less_than", 4)), cond("is", "x", path="event_type"))) == 3
    assert id_upper_bound(conds(conds(cond("less_than", 4), cond("greater_than", 1), op="or"))) is None
    assert id_upper_bound(conds(cond("is", True))) is None  # not an id value
    assert id_upper_bound(conds(cond("in"))) is None


def test_id_lower_bound() -> None:
    assert id_lower_bound(conds()) is None
    assert id_lower_bound(conds(cond("greater_than", 10))) == 11
    assert id_lower_bound(conds(cond("is", 7), cond("greater_than", 3))) == 7
    assert id_lower_bound(conds(cond("in", 3, 12, 5))) == 3
    assert id_lower_bound(conds(cond("between", 2, 8))) == 2
    assert id_lower_bound(conds(cond("less_than", 8))) is None
    assert id_lower_bound(conds(cond("greater_than", 10), op="or")) is None
    assert id_lower_bound(conds(conds(cond("greater_than", 4)), cond("greater_than", 1))) == 5


def test_check_given_up() -> None:
    check_given_up(None, None)  # nothing given up in the read's range
    with pytest.raises(Passthrough) as exc:
        check_given_up(None, 7)  # a bounded read across it
    assert exc.value.reason == "events-ahead"
    check_given_up({"entities": [{"id": 5}, {"id": 6}]}, 7)  # a page that stops below it
    with pytest.raises(Passthrough):
        check_given_up({"entities": [{"id": 6}, {"id": 8}]}, 7)  # a page that could lack it


def test_check_read_and_answer() -> None:
    bounded = {"type": "EventLogEntry", "filters": conds(cond("less_than", 51))}
    assert check_read(bounded, 50) is False
    with pytest.raises(Passthrough) as exc:
        check_read(bounded, 49)
    assert exc.value.reason == "events-ahead"
    with pytest.raises(Passthrough):
        check_read(bounded, None)  # no cursor: nothing is certain
    poller = {"type": "EventLogEntry", "filters": conds(cond("greater_than", 10)),
              "sorts": [{"field_name": "id", "direction": "asc"}],
              "paging": {"entities_per_page": 2, "current_page": 1}, "return_paging_info_without_counts": False}
    assert check_read(poller, 50) is True
    check_answer(poller, {"entities": [{"id": 11}, {"id": 12}], "paging_info": {"has_next_page": True}}, 50)
    for entities, has_next, cursor in (
        ([{"id": 11}], True, 50),  # short page: events above the cursor could fill it
        ([{"id": 11}, {"id": 12}], True, 11),  # reaches past the cursor
        ([{"id": 11}, {"id": 12}], False, 50),  # SG may have a next page the replica lacks
    ):
        with pytest.raises(Passthrough):
            check_answer(poller, {"entities": entities, "paging_info": {"has_next_page": has_next}}, cursor)
    with pytest.raises(Passthrough):
        check_read({**poller, "return_paging_info": True}, 50)  # the count includes events past the cursor
    with pytest.raises(Passthrough):
        check_read({**poller, "sorts": [{"field_name": "id", "direction": "desc"}]}, 50)


# -- the ingester writes event rows -----------------------------------------------------
@pytest.fixture
def client(site: FakeSite) -> SiteClient:
    return SiteClient(site)


@pytest.fixture
def store(db_url: str, site: FakeSite) -> Iterator[Store]:
    st = Store.open(db_url, with_events_schema(site))
    yield st
    st.dispose()


@pytest.fixture
def ingester(store: Store, client: SiteClient, site: FakeSite) -> Iterator[Ingester]:
    proj = make_project(site)
    site.create_direct("Shot", {"code": "before", "project": proj})
    Scanner(store, client).prime(sorted(store.schema.entities))  # events too
    ing = Ingester(store, client, IngestConfig(batch=7, poll_interval=0.01, gap_timeout=300))
    yield ing
    ing.close()


def read(store: Store, params: dict[str, Any]) -> dict[str, Any]:
    base = {"type": "EventLogEntry", "return_fields": EVENT_FIELDS,
            "filters": conds(), "return_only": "active", "paging": {"entities_per_page": 500, "current_page": 1}}
    with store.engine.connect() as conn:
        replica_state = ReplicaState(store.primed_fields(conn), event_cursor=store.get_state(conn, K_CURSOR))
        return Reader(store).read(conn, {**base, **params}, replica_state)


def site_events(site: FakeSite, filters: list[Any] | None = None, limit: int = 0) -> list[dict[str, Any]]:
    rows = site.find_direct("EventLogEntry", filters or [], EVENT_FIELDS, [{"field_name": "id", "direction": "asc"}])
    return rows[:limit] if limit else rows


def test_every_event_becomes_a_row_equal_to_sg(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = site.find_direct("Project", [], ["id"])[0]
    shots = [site.create_direct("Shot", {"code": f"sh{i}", "project": proj}) for i in range(4)]
    site.update_direct("Shot", shots[0]["id"], {"code": "renamed", "sg_cut_in": 12})
    site.update_direct("Shot", shots[1]["id"], {"assets": [site.create_direct("Asset", {"code": "a", "project": proj})]})
    site.delete_direct("Shot", shots[2]["id"])  # SG shows its events' entity as null from now on
    sync(ingester)
    cursor = state(store, K_CURSOR)
    assert cursor == site.last_event_id()
    ours = read(store, {"filters": conds(cond("less_than", cursor + 1)),
                        "sorts": [{"field_name": "id", "direction": "asc"}]})["entities"]
    assert ours == site_events(site)
    assert any(e["entity"] is None and e["event_type"] == "Shotgun_Shot_Change" for e in ours)


def test_event_rows_commit_with_the_poll_or_not_at_all(site: FakeSite, store: Store, ingester: Ingester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll that fails after applying its events (here: moving the cursor) leaves no EventLogEntry row."""
    sync(ingester)
    cursor = state(store, K_CURSOR)
    proj = site.find_direct("Project", [], ["id"])[0]
    site.create_direct("Shot", {"code": "doomed poll", "project": proj})

    def broken(*_args: Any) -> None:
        raise RuntimeError("killed before the cursor moved")

    monkeypatch.setattr(ingester.position, "advance", broken)
    with pytest.raises(RuntimeError):
        ingester.poll_once()
    with store.engine.connect() as conn:
        table = store.tables["EventLogEntry"]
        assert conn.execute(sa.select(sa.func.max(table.c.id))).scalar() == cursor
    assert state(store, K_CURSOR) == cursor
    monkeypatch.undo()
    sync(ingester)
    below = read(store, {"filters": conds(cond("less_than", state(store, K_CURSOR) + 1)),
                         "sorts": [{"field_name": "id", "direction": "asc"}]})
    assert below["entities"] == site_events(site)


def test_reads_past_the_cursor_pass(site: FakeSite, store: Store, ingester: Ingester) -> None:
    sync(ingester)
    cursor = state(store, K_CURSOR)
    proj = site.find_direct("Project", [], ["id"])[0]
    site.create_direct("Shot", {"code": "unseen", "project": proj})  # not polled yet
    for filters in (conds(), conds(cond("less_than", cursor + 2)), conds(cond("greater_than", cursor - 1)),
                    conds(cond("is", "Shotgun_Shot_New", path="event_type"))):
        with pytest.raises(Passthrough) as exc:
            read(store, {"filters": filters})
        assert exc.value.reason == "events-ahead"
    got = read(store, {"filters": conds(cond("between", 1, cursor),
                                        cond("is", "Shotgun_Shot_New", path="event_type"))})["entities"]
    assert got == site_events(site, [["id", "between", [1, cursor]], ["event_type", "is", "Shotgun_Shot_New"]])


def test_reads_across_an_open_gap_pass(site: FakeSite, store: Store, ingester: Ingester) -> None:
    """An event id SG has not shown yet (a transaction still open) holds the cursor below it: reads of
    events above it pass, even below the highest event applied; once it shows, they are hits with it."""
    sync(ingester)
    proj = site.find_direct("Project", [], ["id"])[0]
    [held] = site.hold_event_ids(1)
    site.create_direct("Shot", {"code": "late", "project": proj})  # its event takes the held id, unseen
    site.create_direct("Shot", {"code": "after", "project": proj})  # seen at once, above the gap
    sync(ingester)
    high = site.last_event_id()
    assert state(store, K_CURSOR) == held - 1 and high > held
    for filters in (conds(cond("between", 1, high)), conds(cond("is", high)), conds(cond("less_than", held + 1))):
        with pytest.raises(Passthrough) as exc:
            read(store, {"filters": filters})
        assert exc.value.reason == "events-ahead"
    poller = {"filters": conds(cond("greater_than", held - 3)), "sorts": [{"field_name": "id", "direction": "asc"}],
              "paging": {"entities_per_page": 4, "current_page": 1}}
    with pytest.raises(Passthrough):
        read(store, poller)  # the page would skip the held event: SG shows it once it commits
    below = read(store, {"filters": conds(cond("less_than", held)), "sorts": [{"field_name": "id", "direction": "asc"}]})
    assert below["entities"] == site_events(site, [["id", "less_than", held]])
    site.release_held()
    sync(ingester)
    got = read(store, {"filters": conds(cond("between", 1, high)), "sorts": [{"field_name": "id", "direction": "asc"}]})
    assert got["entities"] == site_events(site, [["id", "between", [1, high]]])
    assert held in [e["id"] for e in got["entities"]]


def test_reads_across_a_given_up_id_that_shows_later_are_sg_s(site: FakeSite, store: Store,
                                                             ingester: Ingester) -> None:
    """An id given up as a gap (a transaction longer than the gap timeout) shows after the cursor
    moved past it: until the sweep applies it, reads of events whose range holds it pass (a daemon
    reading the log through the proxy would skip it for good); reads beside it are still hits."""
    site.set_clock(dt.datetime(2026, 3, 1, 9, 0, 0))
    sync(ingester)
    proj = site.find_direct("Project", [], ["id"])[0]
    [held] = site.hold_event_ids(1)
    site.create_direct("Shot", {"code": "late", "project": proj})
    site.create_direct("Shot", {"code": "visible", "project": proj})
    sync(ingester)
    site.advance_clock(seconds=301)
    site.create_direct("Shot", {"code": "after", "project": proj})
    sync(ingester)  # given up
    site.release_held()  # the long transaction commits
    sync(ingester)  # polls go on (the sweep comes every sweep_every polls)
    cursor = state(store, K_CURSOR)
    assert cursor > held
    by_id = {"sorts": [{"field_name": "id", "direction": "asc"}]}
    for filters in (conds(cond("between", held - 1, cursor)), conds(cond("in", held, cursor))):
        with pytest.raises(Passthrough) as exc:
            read(store, {**by_id, "filters": filters})
        assert exc.value.reason == "events-ahead"
    poller = {**by_id, "filters": conds(cond("greater_than", held - 2)),
              "paging": {"entities_per_page": 2, "current_page": 1}}
    with pytest.raises(Passthrough):
        read(store, poller)  # the page would skip the late event
    got = read(store, {**by_id, "filters": conds(cond("less_than", held))})["entities"]
    assert got == site_events(site, [["id", "less_than", held]])  # below it: a hit
    got = read(store, {**by_id, "filters": conds(cond("between", held + 1, cursor))})["entities"]
    assert got == site_events(site, [["id", "between", [held + 1, cursor]]])  # above it: a hit
    assert ingester.sweep().swept == [held]
    got = read(store, {**by_id, "filters": conds(cond("between", held - 1, cursor))})["entities"]
    assert got == site_events(site, [["id", "between", [held - 1, cursor]]])
    assert held in [e["id"] for e in got]


def test_poller_pattern_never_misses_an_event(site: FakeSite, store: Store, ingester: Ingester) -> None:
    """A daemon polling ``id > last`` (id ascending, a page of 3) through the replica, falling back to
    SG when the replica passes, sees every event exactly once, in order, while events keep coming."""
    sync(ingester)
    proj = site.find_direct("Project", [], ["id"])[0]
    seen: list[int] = []
    hits = 0
    last = 0
    for round_ in range(12):
        shot = site.create_direct("Shot", {"code": f"p{round_}", "project": proj})
        site.update_direct("Shot", shot["id"], {"sg_cut_in": round_})
        if round_ % 2:
            ingester.poll_once()  # the ingester lags, sometimes by several polls
        for _ in range(4):
            params = {"filters": conds(cond("greater_than", last)), "sorts": [{"field_name": "id", "direction": "asc"}],
                      "paging": {"entities_per_page": 3, "current_page": 1}, "return_fields": ["id"]}
            try:
                page = [e["id"] for e in read(store, params)["entities"]]
                hits += 1
                assert page == [e["id"] for e in site_events(site, [["id", "greater_than", last]], limit=3)]
            except Passthrough as exc:
                assert exc.reason == "events-ahead"
                page = [e["id"] for e in site_events(site, [["id", "greater_than", last]], limit=3)]
            seen.extend(page)
            if page:
                last = page[-1]
    seen.extend(e["id"] for e in site_events(site, [["id", "greater_than", last]]))
    assert seen == [e["id"] for e in site_events(site)]
    assert hits > 0  # the replica answered some pages


def test_sweep_after_a_fresh_prime_applies_nothing(site: FakeSite, store: Store, ingester: Ingester,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The prime's events (at or below its cursor) are no late-visible gaps."""
    proj = site.find_direct("Project", [], ["id"])[0]
    site.create_direct("Shot", {"code": "after", "project": proj})  # SG's clock is known from here
    sync(ingester)
    with caplog.at_level("WARNING", logger="sgcache.events"):
        result = ingester.sweep()
    assert result.swept == []
    assert "sweep: applied" not in caplog.text


def assert_events_up_to_the_cursor_are_sgs(site: FakeSite, store: Store) -> None:
    """The replica's EventLogEntry rows up to the cursor, read as a client reads them, are SG's."""
    cursor = state(store, K_CURSOR)
    ours = read(store, {"filters": conds(cond("less_than", cursor + 1)),
                        "sorts": [{"field_name": "id", "direction": "asc"}]})["entities"]
    assert ours == site_events(site)


def test_event_rows_polled_while_their_entity_was_retired_show_it_after_its_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """A Shot created and retired before the poll: its events are polled with ``entity`` None (SG
    hides the retired Shot) and stored so. SG shows the Shot again in them once it is revived (no
    event for those rows); the replica never held the link, so the revival's re-read of the rows
    linking the Shot (WriteBatch.linking) does not find them and they read None for good."""
    proj = site.find_direct("Project", [], ["id"])[0]
    shot = site.create_direct("Shot", {"code": "gone", "project": proj})
    site.delete_direct("Shot", shot["id"])
    sync(ingester)
    site.revive_direct("Shot", shot["id"])
    sync(ingester)
    assert_events_up_to_the_cursor_are_sgs(site, store)


def test_a_revivals_search_reads_events_by_their_entity_only(store: Store) -> None:
    """A revived user's search asks for the events whose subject it is, not every event it made
    (``EventLogEntry.user``: all of a user's events, read again for one revival)."""
    from cache.replica import linksearch

    assert "EventLogEntry" in store.tables
    fields = {(owner, fname) for owner, fname, _s in linksearch.link_fields(store, "HumanUser")}
    assert ("EventLogEntry", "entity") in fields and ("Task", "task_assignees") in fields
    assert not {f for o, f in fields if o == "EventLogEntry"} - {"entity"}


def test_event_rows_polled_before_their_entity_s_late_retirement_show_it_after_its_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """As above, with the Shot's Retirement committed late (its id held): the poll reads the Shot's
    events with ``entity`` None while the replica holds the Shot live, so they are stored None (the
    batch cannot tell SG hid a retired entity). Once the Shot is revived, SG shows it in those
    events again (no event for them): the revival must bring the link back, as for any other row
    first read while the entity it links was retired (cache/replica/linksearch.py)."""
    proj = site.find_direct("Project", [], ["id"])[0]
    shot = site.create_direct("Shot", {"code": "gone", "project": proj})
    site.hold_event_ids(2)  # the retirement's two events (retirement_date, Retirement)
    site.delete_direct("Shot", shot["id"])
    site.create_direct("Shot", {"code": "later", "project": proj})  # the held ids become a gap
    sync(ingester)
    site.release_held()
    sync(ingester)
    site.revive_direct("Shot", shot["id"])
    sync(ingester)
    assert_events_up_to_the_cursor_are_sgs(site, store)
