"""Unit tests of the event ingester: the fake SG in-process, the replica on ``db_url``."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from cache.ingest import IngestConfig, Ingester, LockHeld, replay
from cache.ingest.batch import store_raw
from cache.replica.statekeys import EVENT_CURSOR as K_CURSOR
from cache.replica.statekeys import EVENT_HIGH as K_HIGH
from cache.replica.statekeys import INGESTER_HEARTBEAT as K_HEARTBEAT
from cache.replica.statekeys import SG_CLOCK as K_SG_CLOCK
from cache.replica.store import Store
from cache.wire import parse_wire_dt

from .fakesg import FakeSite
from .replica import (
    SiteClient,
    assert_equal_to_site,
    cached_schema,
    make_project,
    prime,
    replica_read,
    state,
    sync,
)


class Clock:
    """A controllable local clock for gap timeouts."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def client(site: FakeSite) -> SiteClient:
    return SiteClient(site)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db_url: str, site: FakeSite) -> Iterator[Store]:
    st = Store.open(db_url, cached_schema(site))
    yield st
    st.dispose()


@pytest.fixture
def ingester(store: Store, client: SiteClient, clock: Clock) -> Iterator[Ingester]:
    prime(store, client)
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01, gap_timeout=300), clock=clock)
    yield ing
    ing.close()


@pytest.fixture
def service(store: Store, site: FakeSite, tmp_path: Any) -> Iterator[Any]:
    """A proxy's CacheService on the same replica: its learnt writes race the ingester's."""
    from cache.proxy.service import CacheService

    schema_path = tmp_path / "schema.yml"
    schema_path.write_text(cached_schema(site).to_yaml())
    # write_wait=0: learning waits as long as it takes (a loaded machine's 2 s ran out and fell back
    # to markers); the test that gives up on a learn sets its own wait
    proxy = CacheService(store.engine.url.render_as_string(hide_password=False), schema_path, max_lag=0,
                         write_wait=0)
    yield proxy
    proxy.close()


def change_rows(store: Store, **where: Any) -> list[Any]:
    t = store.changes
    cond = [t.c[k] == v for k, v in where.items()]
    with store.engine.connect() as conn:
        return conn.execute(sa.select(t).where(*cond).order_by(t.c.seq)).all()


def queued(store: Store) -> list[tuple[str, int]]:
    q = store.fetch_queue
    with store.engine.connect() as conn:
        return [(r.entity_type, r.entity_id) for r in conn.execute(sa.select(q))]


PROJECT = {"type": "Project", "id": 1}


# -- each event kind -------------------------------------------------------------------
def test_new_fetches_the_row_and_in_create_changes_add_nothing(site: FakeSite, store: Store,
                                                             ingester: Ingester) -> None:
    proj = make_project(site)
    seq = site.create_direct("Sequence", {"code": "SQ01", "project": proj})
    site.create_direct("Shot", {"code": "sh010", "project": proj, "sg_sequence": seq, "sg_cut_in": 1001})
    sync(ingester)
    assert_equal_to_site(store, site)
    assert queued(store) == []
    shot_rows = change_rows(store, entity_type="Shot")
    assert [r.source for r in shot_rows] == ["fetch"]  # created by the fetch; in_create Changes skipped
    assert state(store, K_CURSOR) == site.last_event_id() == state(store, K_HIGH)
    assert state(store, K_HEARTBEAT)


def test_changes_of_scalars_links_and_multi_entity(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = make_project(site)
    seq = site.create_direct("Sequence", {"code": "SQ01", "project": proj})
    assets = [site.create_direct("Asset", {"code": f"a{i}", "project": proj}) for i in range(3)]
    shot = site.create_direct("Shot", {"code": "sh010", "project": proj, "assets": assets[:2]})
    sync(ingester)
    first = site.last_event_id()
    site.update_direct("Shot", shot["id"], {"code": "sh011", "sg_cut_in": 7, "sg_sequence": seq,
                                            "sg_status_list": "ip"})
    site.update_direct("Shot", shot["id"], {"assets": [assets[2]]}, modes={"assets": "add"})
    site.update_direct("Shot", shot["id"], {"assets": [assets[0]]}, modes={"assets": "remove"})
    site.update_direct("Asset", assets[1]["id"], {"code": "renamed"})  # the link's name follows
    sync(ingester)
    assert_equal_to_site(store, site)
    assert queued(store) == []
    rows = [r for r in change_rows(store, source="event") if r.event_id > first]
    assert {(r.entity_type, r.field_name) for r in rows} >= {
        ("Shot", "code"), ("Shot", "sg_cut_in"), ("Shot", "sg_sequence"), ("Shot", "assets"), ("Asset", "code")}


def test_a_multi_entity_set_that_puts_a_new_link_before_a_kept_one_reads_in_sgs_order(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """Shot.assets [a0, a1] set to [a2, a1]: the event says only "added a2, removed a0", which the
    replica would apply as [a1, a2]; SG holds [a2, a1]. The event cannot tell that order from an
    ``add`` (appended), so the row is read again; as it is after a set that only reorders the list
    (an event with nothing added or removed)."""
    proj = make_project(site)
    assets = [site.create_direct("Asset", {"code": f"a{i}", "project": proj}) for i in range(3)]
    shot = site.create_direct("Shot", {"code": "sh010", "project": proj, "assets": assets[:2]})
    sync(ingester)
    site.update_direct("Shot", shot["id"], {"assets": [assets[2], assets[1]]})
    sync(ingester)
    assert_equal_to_site(store, site)
    site.update_direct("Shot", shot["id"], {"assets": [assets[1], assets[2]]})  # nothing added or removed
    sync(ingester)
    assert_equal_to_site(store, site)


def test_buffered_links_and_retirements_match_the_per_event_path(site: FakeSite, store: Store,
                                                                 ingester: Ingester) -> None:
    """One batch with a remove/re-add of a link and a retire/revive/retire: the buffered writes
    leave SG's link order, one change-log row per effective change and the registry's flag."""
    proj = make_project(site)
    assets = [site.create_direct("Asset", {"code": f"a{i}", "project": proj}) for i in range(3)]
    shot = site.create_direct("Shot", {"code": "sh010", "project": proj, "assets": assets[:2]})
    sync(ingester)
    first = site.last_event_id()
    site.update_direct("Shot", shot["id"], {"assets": [assets[0]]}, modes={"assets": "remove"})
    site.update_direct("Shot", shot["id"], {"assets": [assets[2], assets[0]]}, modes={"assets": "add"})
    site.update_direct("Shot", shot["id"], {"assets": [assets[1]]}, modes={"assets": "remove"})
    site.delete_direct("Asset", assets[1]["id"])
    site.revive_direct("Asset", assets[1]["id"])
    site.delete_direct("Asset", assets[1]["id"])
    sync(ingester)
    assert_equal_to_site(store, site)
    rows = [r for r in change_rows(store, source="event") if r.event_id > first]
    links = [(json.loads(r.old), json.loads(r.new)) for r in rows if r.field_name == "assets"]
    assert [([x["id"] for x in old], [x["id"] for x in new]) for old, new in links] == [
        ([assets[0]["id"]], []), ([], [assets[2]["id"], assets[0]["id"]]), ([assets[1]["id"]], [])]
    flags = [(r.entity_id, r.new) for r in rows if r.field_name == "retired"]
    assert flags == [(assets[1]["id"], "true"), (assets[1]["id"], "false"), (assets[1]["id"], "true")]
    with store.engine.connect() as conn:
        reg = store.entities
        assert conn.execute(sa.select(reg.c.retired).where((reg.c.type == "Asset")
                                                           & (reg.c.id == assets[1]["id"]))).scalar_one()


def test_backref_is_applied_once(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = make_project(site)
    shots = [site.create_direct("Shot", {"code": f"sh{i}", "project": proj}) for i in (1, 2)]
    task = site.create_direct("Task", {"content": "anim", "project": proj})
    sync(ingester)
    mark = site.last_event_id()
    site.update_direct("Task", task["id"], {"entity": shots[0]})
    site.update_direct("Task", task["id"], {"entity": shots[1]})  # removes from shot 1, adds to shot 2
    site.update_direct("Shot", shots[0]["id"], {"tasks": [task]}, modes={"tasks": "add"})  # moves it back
    sync(ingester)
    assert_equal_to_site(store, site)
    events = site.events(mark)
    backrefs = [e for e in events if (e["meta"] or {}).get("actual_attribute_changed")]
    assert backrefs, "the fake writes inverse-side events"
    per_event = [(r.event_id, r.entity_type, r.entity_id, r.field_name) for r in change_rows(store, source="event")]
    assert len(per_event) == len(set(per_event))


def test_retirement_hides_links_and_revival_restores_them(site: FakeSite, store: Store,
                                                          ingester: Ingester) -> None:
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    task = site.create_direct("Task", {"content": "comp", "project": proj, "entity": shot})
    sync(ingester)
    site.delete_direct("Task", task["id"])
    sync(ingester)
    assert_equal_to_site(store, site)
    assert replica_read(store, "Shot", ["tasks"], False)[0]["tasks"] == []
    assert [t["id"] for t in replica_read(store, "Task", ["content"], True)] == [task["id"]]
    site.revive_direct("Task", task["id"])
    sync(ingester)
    assert_equal_to_site(store, site)
    assert [t["id"] for t in replica_read(store, "Shot", ["tasks"], False)[0]["tasks"]] == [task["id"]]


def test_revival_restores_a_link_a_fetch_dropped_while_retired(site: FakeSite, store: Store,
                                                               ingester: Ingester) -> None:
    """SG hides a retired Note from Shot.notes and shows it again on revival, with no event for
    the Shot. A fetch of the Shot between the retirement in SG and its event here drops the link
    (SG's answer lacks it and the replica did not know the Note was retired): the revival must
    read the Shot again (the race the 16-writer stress test found)."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    note = site.create_direct("Note", {"subject": "n", "project": proj, "note_links": [shot]})
    sync(ingester)
    site.delete_direct("Note", note["id"])
    with store.engine.begin() as conn:  # the Shot's fetch runs before the Retirement is polled
        fetched = site.find_direct("Shot", [["id", "is", shot["id"]]], ["notes"])
        store.write_entities(conn, "Shot", fetched, "fetch")
    assert replica_read(store, "Shot", ["notes"], False)[0]["notes"] == []
    site.revive_direct("Note", note["id"])
    sync(ingester)
    assert_equal_to_site(store, site)
    assert [n["id"] for n in replica_read(store, "Shot", ["notes"], False)[0]["notes"]] == [note["id"]]


def test_revival_polled_before_the_proxy_learnt_it_restores_a_link_a_fetch_dropped(
        site: FakeSite, store: Store, ingester: Ingester, service: Any) -> None:
    """As above, with the Note deleted and revived through the proxy (CI's 16-writer run on
    PostgreSQL, a Task's ``notes`` left without a revived Note): the Shot's fetch runs between SG's
    retirement and the proxy learning it, and the ingester polls the Revival before the proxy has
    learnt the revive. The replica still shows the Note retired (a proxy wrote it), so the revival
    reads the Note again; it must read the rows linked to it again too."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    note = site.create_direct("Note", {"subject": "n", "project": proj, "note_links": [shot]})
    sync(ingester)
    params = {"type": "Note", "id": note["id"]}
    mark = service.write_mark()
    deleted = site._direct("delete", params, True)
    with store.engine.begin() as conn:  # the ingester's fetch of the Shot, before the proxy learns the delete
        fetched = site.find_direct("Shot", [["id", "is", shot["id"]]], ["notes"])
        store.write_entities(conn, "Shot", fetched, "fetch")
    service.learn("delete", params, deleted, mark)
    mark = service.write_mark()
    revived = site._direct("revive", params, True)
    sync(ingester)  # the Revival, polled while the replica shows the Note retired
    service.learn("revive", params, revived, mark)
    sync(ingester)
    assert [n["id"] for n in replica_read(store, "Shot", ["notes"], False)[0]["notes"]] == [note["id"]]
    assert_equal_to_site(store, site)


def shot_task_version(site: FakeSite, ingester: Ingester) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A Shot, a Task of it and a Version of that Task (``sg_task``: the Task has no field listing
    its Versions), in the replica."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    task = site.create_direct("Task", {"content": "comp", "project": proj, "entity": shot})
    version = site.create_direct("Version", {"code": "v1", "project": proj, "entity": shot, "sg_task": task})
    sync(ingester)
    return shot, task, version


def cleared_while_retired(site: FakeSite, store: Store, ingester: Ingester, linked: tuple[str, int],
                          row: tuple[str, int], field: str, empty: Any, later: dict[str, Any]) -> None:
    """``linked`` is retired; SG then clears ``row``'s ``field`` (to ``empty``), its event late, so the
    replica takes it from a re-read of the row, which keeps the hidden link; ``linked`` is revived.
    The row reads ``empty`` throughout, as SG (``later``: a later write to the row, making the late
    event a gap)."""
    site.delete_direct(*linked)
    sync(ingester)
    site.hold_event_ids(1)
    site.update_direct(*row, {field: empty})
    site.update_direct(*row, later)
    sync(ingester)
    site.release_held()
    sync(ingester)
    assert replica_read(store, row[0], [field], False)[0][field] == empty
    site.revive_direct(*linked)
    sync(ingester)
    assert replica_read(store, row[0], [field], False)[0][field] == empty
    assert_equal_to_site(store, site)


def test_an_entity_link_a_fetch_read_while_its_entity_was_retired_shows_again_on_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """SG shows a single-entity link to a retired entity as None, and the link again on revival,
    with no event for the linking row. A Version re-read while its Task is retired (here the
    Task has no field listing its Versions: nothing else brings the link back) must keep the
    link, hidden while the Task is retired, as a multi_entity list keeps its hidden links."""
    shot, task, version = shot_task_version(site, ingester)
    site.delete_direct("Task", task["id"])
    sync(ingester)
    with store.engine.begin() as conn:  # the Version re-read (a fetch, a reconcile) while the Task is retired
        fetched = site.find_direct("Version", [["id", "is", version["id"]]], ["sg_task"])
        assert fetched[0]["sg_task"] is None
        store.write_entities(conn, "Version", fetched, "fetch")
    assert replica_read(store, "Version", ["sg_task"], False)[0]["sg_task"] is None
    site.revive_direct("Task", task["id"])
    sync(ingester)
    assert replica_read(store, "Version", ["sg_task"], False)[0]["sg_task"]["id"] == task["id"]
    assert_equal_to_site(store, site)


def test_an_entity_link_sg_cleared_while_its_entity_was_retired_stays_cleared_on_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """The other reading of the same None: SG cleared the Version's ``sg_task`` while the Task
    was retired, and the replica took it from a re-read of the Version (its event came late), which
    keeps the hidden link. On the Task's revival that Version is read again: it shows None, as SG."""
    _shot, task, version = shot_task_version(site, ingester)
    cleared_while_retired(site, store, ingester, ("Task", task["id"]), ("Version", version["id"]), "sg_task", None,
                          {"code": "v1b"})


def test_a_multi_entity_link_sg_removed_while_its_entity_was_retired_stays_removed_on_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """The same for a multi_entity list with no known pair: SG removed the user from the Task's
    assignees while the user was retired, and the replica took it from a re-read of the Task (its
    event came late), which keeps the hidden link. On the user's revival the Task is read again."""
    proj = make_project(site)
    user = site.create_direct("HumanUser", {"login": "ann", "firstname": "Ann", "lastname": "A"})
    task = site.create_direct("Task", {"content": "comp", "project": proj,
                                       "task_assignees": [{"type": "HumanUser", "id": user["id"]}]})
    sync(ingester)
    cleared_while_retired(site, store, ingester, ("HumanUser", user["id"]), ("Task", task["id"]), "task_assignees", [],
                          {"content": "comp2"})


def test_a_fetch_before_the_retirement_is_polled_keeps_the_link_for_the_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """The Task is retired at SG, and the Version is fetched before the ingester has polled that:
    SG's row shows ``sg_task`` None while the replica holds the Task live, so the replica cannot
    tell a cleared link from a retired entity. The row waits for a poll that reaches the end of the
    log (the retirement then applied, the link is kept hidden); stored then, it shows the Task
    again on revival, as SG does. Stored at once, the link was lost for good."""
    shot, task, version = shot_task_version(site, ingester)
    site.delete_direct("Task", task["id"])
    site.update_direct("Version", version["id"], {"code": "v1b"})
    with store.engine.begin() as conn:
        store.queue_fetch(conn, [("Version", version["id"])], "test")
    ingester.process_fetch_queue()  # before the poll: SG's Version leaves the live Task out
    assert queued(store) == [("Version", version["id"])]
    assert replica_read(store, "Version", ["code"], False)[0]["code"] == "v1"  # not stored yet
    sync(ingester)
    assert queued(store) == []
    assert replica_read(store, "Version", ["code", "sg_task"], False)[0]["sg_task"] is None
    site.revive_direct("Task", task["id"])
    sync(ingester)
    assert replica_read(store, "Version", ["sg_task"], False)[0]["sg_task"]["id"] == task["id"]
    assert_equal_to_site(store, site)


def test_a_link_sg_cleared_is_stored_once_its_event_is_polled(site: FakeSite, store: Store,
                                                             ingester: Ingester) -> None:
    """The same wait when SG did clear the link: the Version is stored, without it, after the poll."""
    shot, task, version = shot_task_version(site, ingester)
    site.update_direct("Version", version["id"], {"sg_task": None})
    with store.engine.begin() as conn:
        store.queue_fetch(conn, [("Version", version["id"])], "test")
    ingester.process_fetch_queue()
    assert queued(store) == [("Version", version["id"])]
    sync(ingester)
    assert queued(store) == []
    assert replica_read(store, "Version", ["sg_task"], False)[0]["sg_task"] is None
    assert_equal_to_site(store, site)


def retired_late_while_fetched(site: FakeSite, store: Store, ingester: Ingester, task: dict[str, Any],
                               row: tuple[str, int], change: dict[str, Any], polls: int) -> None:
    """The Task is retired with its events committing late (a gap) and ``row``, which links it,
    changed and fetched meanwhile (SG's row leaves the Task out while the replica holds it live);
    ``polls`` polls reach the end of the log with the gap open, each followed by the fetch step;
    then the gap closes, and the Task is revived."""
    site.hold_event_ids(2)  # the retirement_date Change and the Retirement commit late
    site.delete_direct("Task", task["id"])
    site.update_direct(row[0], row[1], change)
    with store.engine.begin() as conn:
        store.queue_fetch(conn, [row], "test")
    for _ in range(polls):
        ingester.poll_once()
        ingester.process_fetch_queue()  # held: SG's row leaves the live Task out
        time.sleep(1.1)  # pending.MARGIN
    site.release_held()
    sync(ingester)
    site.revive_direct("Task", task["id"])
    sync(ingester)


def test_a_fetch_while_the_retirement_is_in_a_gap_keeps_the_link_for_the_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """The Task's retirement commits late (its events in a gap) and the Version is fetched before
    it shows: SG's row leaves the Task out while the replica holds it live. A poll that reaches the
    end of the log with the gap open has not applied the retirement: the Version must still wait,
    else it is stored without the link, and SG shows the Task again on its revival (no event for
    the Version) while the replica shows None, for good."""
    _shot, task, version = shot_task_version(site, ingester)
    retired_late_while_fetched(site, store, ingester, task, ("Version", version["id"]), {"code": "v1b"}, polls=2)
    assert replica_read(store, "Version", ["sg_task"], False)[0]["sg_task"]["id"] == task["id"]
    assert_equal_to_site(store, site)


def test_a_late_retirement_is_fetched_before_the_row_held_for_its_link(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """As test_a_fetch_while_the_retirement_is_in_a_gap_keeps_the_link_for_the_revival, with a
    PublishedFile (its type fetched before Task's): the late Retirement only queues the Task (its
    retired flag comes with its fetch), so the PublishedFile read again in the same round still
    finds the Task live here and is stored without ``task``; the Task's revival then leaves it
    None for good."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    task = site.create_direct("Task", {"content": "comp", "project": proj, "entity": shot})
    pf = site.create_direct("PublishedFile", {"code": "pf", "project": proj, "entity": shot, "task": task})
    sync(ingester)
    retired_late_while_fetched(site, store, ingester, task, ("PublishedFile", pf["id"]), {"code": "pf2"}, polls=1)
    assert replica_read(store, "PublishedFile", ["task"], False)[0]["task"]["id"] == task["id"]
    assert_equal_to_site(store, site)


def test_an_entity_link_to_an_uncached_type_sg_cleared_while_retired_stays_cleared_on_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """As test_an_entity_link_sg_cleared_while_its_entity_was_retired_stays_cleared_on_revival,
    with a link to an uncached type (``Shot.task_template``): the re-read keeps the hidden link
    (the registry knows the TaskTemplate retired), so its revival must read the Shot again too;
    else the replica shows the TaskTemplate again where SG shows None, for good."""
    assert "TaskTemplate" not in store.tables
    proj = make_project(site)
    tmpl = site.create_direct("TaskTemplate", {"code": "t"})
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj,
                                       "task_template": {"type": "TaskTemplate", "id": tmpl["id"]}})
    sync(ingester)
    cleared_while_retired(site, store, ingester, ("TaskTemplate", tmpl["id"]), ("Shot", shot["id"]), "task_template",
                          None, {"code": "sh1b"})


def version_first_read_while_its_task_is_retired(site: FakeSite,
                                                 ingester: Ingester) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Task in the replica, then a Version of it created and the Task retired before the ingester
    read the Version: it is stored with ``sg_task`` None (SG hides the retired Task), and the
    replica never held the link. Returns (task, version)."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    task = site.create_direct("Task", {"content": "comp", "project": proj, "entity": shot})
    sync(ingester)
    version = site.create_direct("Version", {"code": "v1", "project": proj, "entity": shot, "sg_task": task})
    site.delete_direct("Task", task["id"])
    sync(ingester)
    return task, version


def test_a_row_first_read_while_its_linked_entity_is_retired_shows_the_link_on_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """A Version is created with its Task, and the Task retired before the ingester read the new
    row: SG's row shows ``sg_task`` None, and the replica never held the link to keep hidden. SG
    shows the link again on the Task's revival, with no event for the Version, so the revival asks
    SG which rows link the Task and reads them again. Before: None for good."""
    task, version = version_first_read_while_its_task_is_retired(site, ingester)
    assert [r["sg_task"] for r in replica_read(store, "Version", ["sg_task"], False)] == [None]
    site.revive_direct("Task", task["id"])
    sync(ingester)
    assert [r["sg_task"]["id"] for r in replica_read(store, "Version", ["sg_task"], False)
            if r["id"] == version["id"]] == [task["id"]]
    assert_equal_to_site(store, site)


def test_a_multi_entity_link_first_read_while_its_entity_is_retired_shows_on_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """The same for a multi_entity list with no known pair: a Task created with a user among its
    assignees, the user retired before the ingester read the Task. On the user's revival SG lists
    the user again; so must the replica."""
    proj = make_project(site)
    user = site.create_direct("HumanUser", {"login": "ann", "firstname": "Ann", "lastname": "A"})
    sync(ingester)
    task = site.create_direct("Task", {"content": "comp", "project": proj,
                                       "task_assignees": [{"type": "HumanUser", "id": user["id"]}]})
    site.delete_direct("HumanUser", user["id"])
    sync(ingester)
    site.revive_direct("HumanUser", user["id"])
    sync(ingester)
    assert [[a["id"] for a in r["task_assignees"]] for r in replica_read(store, "Task", ["task_assignees"], False)
            if r["id"] == task["id"]] == [[user["id"]]]
    assert_equal_to_site(store, site)


def test_a_row_primed_while_its_linked_entity_was_retired_shows_the_link_on_revival(
        site: FakeSite, store: Store, client: SiteClient, clock: Clock) -> None:
    """The replica is primed (a full scan) while a Version's Task is retired: SG shows the
    Version's ``sg_task`` as None then. The Task's revival, polled by the ingester, must bring the
    link back, as SG shows it."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    task = site.create_direct("Task", {"content": "comp", "project": proj, "entity": shot})
    version = site.create_direct("Version", {"code": "v1", "project": proj, "entity": shot, "sg_task": task})
    site.delete_direct("Task", task["id"])
    prime(store, client)
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01, gap_timeout=300), clock=clock)
    try:
        site.revive_direct("Task", task["id"])
        sync(ing)
    finally:
        ing.close()
    assert [r["sg_task"]["id"] for r in replica_read(store, "Version", ["sg_task"], False)
            if r["id"] == version["id"]] == [task["id"]]
    assert_equal_to_site(store, site)


def test_reads_of_the_links_to_a_revived_entity_pass_until_sg_was_asked_for_them(
        site: FakeSite, store: Store, ingester: Ingester, service: Any) -> None:
    """Between the poll that applies a revival and the fetches that bring the rows SG shows
    linking the revived entity again, a read of those links passes (``pending-write``) rather
    than answer from rows that may lack them; the rest of the type is served."""
    from cache.errors import Passthrough

    task, _version = version_first_read_while_its_task_is_retired(site, ingester)
    site.revive_direct("Task", task["id"])
    ingester.poll_once()  # the revival applied; SG not asked yet
    read = {"type": "Version", "return_fields": ["sg_task"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    with pytest.raises(Passthrough) as passed:
        service.read(read)
    assert passed.value.reason == "pending-write"
    assert [r["code"] for r in service.read({**read, "return_fields": ["code"]})["entities"]] == ["v1"]
    sync(ingester)
    assert [r["sg_task"]["id"] for r in replica_read(store, "Version", ["sg_task"], False)] == [task["id"]]


def test_a_link_search_sg_keeps_refusing_goes_to_the_back_of_the_searches(
        site: FakeSite, store: Store, client: SiteClient, ingester: Ingester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search SG keeps failing (the Task's) is queued again behind the others, so a later
    revival's search (a user's) is asked although the step reads one search at a time."""
    proj = make_project(site)
    task = site.create_direct("Task", {"content": "comp", "project": proj})
    user = site.create_direct("HumanUser", {"login": "ann", "firstname": "Ann", "lastname": "A"})
    sync(ingester)
    for entity_type, entity_id in (("Task", task["id"]), ("HumanUser", user["id"])):
        site.delete_direct(entity_type, entity_id)
        sync(ingester)
    site.revive_direct("Task", task["id"])
    ingester.poll_once()
    site.revive_direct("HumanUser", user["id"])
    ingester.poll_once()
    find = client.find

    def failing(entity_type: str, filters: Any, *args: Any, **kwargs: Any) -> Any:
        if filters and isinstance(filters[0], list) and filters[0][0] != "id" and filters[0][2] and \
                isinstance(filters[0][2][0], dict) and filters[0][2][0].get("type") == "Task":
            raise RuntimeError("SG timed out")
        return find(entity_type, filters, *args, **kwargs)

    monkeypatch.setattr(client, "find", failing)

    def searches() -> list[str]:
        with store.engine.connect() as conn:
            return [r.entity_type for r in conn.execute(sa.select(store.link_search.c.entity_type))]

    assert sorted(searches()) == ["HumanUser", "Task"]
    ingester.process_fetch_queue(limit=1)  # the Task's, the oldest: fails
    ingester.process_fetch_queue(limit=1)  # the user's, now ahead of it
    assert searches() == ["Task"]


def test_a_link_search_sg_refuses_is_asked_again(site: FakeSite, store: Store, client: SiteClient,
                                                ingester: Ingester, monkeypatch: pytest.MonkeyPatch) -> None:
    """SG fails the search for the rows linking a revived Task (a timeout, a 5xx): the search
    stays queued, and the next fetch step asks again; the Version then shows its Task."""
    task, version = version_first_read_while_its_task_is_retired(site, ingester)
    site.revive_direct("Task", task["id"])
    find = client.find

    def failing(entity_type: str, filters: Any, *args: Any, **kwargs: Any) -> Any:
        if entity_type == "Version" and filters and filters[0][0] == "sg_task":
            raise RuntimeError("SG timed out")
        return find(entity_type, filters, *args, **kwargs)

    monkeypatch.setattr(client, "find", failing)
    ingester.poll_once()
    ingester.process_fetch_queue()
    with store.engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(sa.select(store.link_search.c.entity_type,
                                                         store.link_search.c.entity_id))] == [("Task", task["id"])]
    monkeypatch.setattr(client, "find", find)
    sync(ingester)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(store.link_search)).first() is None
    assert [r["sg_task"]["id"] for r in replica_read(store, "Version", ["sg_task"], False)
            if r["id"] == version["id"]] == [task["id"]]


def test_a_retired_row_first_read_while_its_linked_entity_was_retired_shows_the_link_on_revival(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """A Version created with its Task, the Task retired before the ingester read the Version,
    then the Version retired too. On the Task's revival SG shows the retired Version's ``sg_task``
    again (a ``retired_only`` read); the link search must ask for retired rows too, else the
    replica answers None for good."""
    task, version = version_first_read_while_its_task_is_retired(site, ingester)
    site.delete_direct("Version", version["id"])
    sync(ingester)
    site.revive_direct("Task", task["id"])
    sync(ingester)
    assert [r["sg_task"] for r in site.find_direct("Version", [], ["sg_task"], retired_only=True)] == [
        {"type": "Task", "id": task["id"], "name": "comp"}]
    assert [r["sg_task"] and r["sg_task"]["id"] for r in replica_read(store, "Version", ["sg_task"], True)] == [
        task["id"]]
    assert_equal_to_site(store, site)


def test_backref_read_after_its_subject_was_retired_is_not_lost(site: FakeSite, store: Store,
                                                                ingester: Ingester) -> None:
    """Catching up: Task.entity set to a Shot, then the Shot retired. The backref event (Shot.tasks
    added the Task) is read with a null ``entity`` (the Shot is retired) and its meta names the
    Task: the Shot is found through the original event and fetched, retired, with its ``tasks``."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    task = site.create_direct("Task", {"content": "anim", "project": proj})
    sync(ingester)
    site.update_direct("Task", task["id"], {"entity": shot})
    site.delete_direct("Shot", shot["id"])
    sync(ingester)
    theirs = site.find_direct("Shot", [["id", "is", shot["id"]]], ["tasks"], retired_only=True)
    assert [t["id"] for t in theirs[0]["tasks"]] == [task["id"]]
    assert [t["id"] for t in replica_read(store, "Shot", ["tasks"], True)[0]["tasks"]] == [task["id"]]


def test_task_template_tasks_arrive_through_their_own_new_events(site: FakeSite, store: Store,
                                                                  ingester: Ingester) -> None:
    proj = make_project(site)
    template = site.add_task_template(1, "basic", [{"content": "layout"}, {"content": "anim"}])
    site.create_direct("Shot", {"code": "sh1", "project": proj, "task_template": template})
    sync(ingester)
    assert_equal_to_site(store, site)
    assert sorted(t["content"] for t in replica_read(store, "Task", ["content"], False)) == ["anim", "layout"]


@pytest.mark.parametrize("poison", ["id out of range", "link out of range", "type name too long"])
def test_an_event_the_database_cannot_hold_does_not_stall_the_stream(site: FakeSite, store: Store,
                                                                     ingester: Ingester, poison: str) -> None:
    """Any script may create EventLogEntry rows, with any meta: one naming an entity the replica
    cannot hold (an id beyond 64 bits, a type name longer than its columns) made every poll fail
    for good (PostgreSQL refused the value, SQLite's driver too), so no later event was applied."""
    from .fakesg.site import _Caller

    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    script = _Caller(user=None, label="a script")
    with site._lock:
        if poison == "id out of range":
            site._write_event(script, "Shotgun_Shot_Retirement", None, None,
                              {"type": "entity_retirement", "entity_id": 2**70})
        elif poison == "link out of range":
            site._write_event(script, "Shotgun_Shot_Change", {"type": "Shot", "id": shot["id"]}, "assets",
                              {"type": "attribute_change", "attribute_name": "assets", "entity_type": "Shot",
                               "entity_id": shot["id"], "field_data_type": "multi_entity",
                               "added": [{"type": "Asset", "id": 2**70}], "removed": []})
        else:
            site._write_event(script, "Shotgun_" + "X" * 70 + "_Retirement", None, None,
                              {"type": "entity_retirement", "entity_id": 5})
    site.update_direct("Shot", shot["id"], {"code": "after it"})
    sync(ingester)
    assert_equal_to_site(store, site)
    assert state(store, K_CURSOR) == site.last_event_id()


def test_noise_and_uncached_types_only_advance(site: FakeSite, store: Store, ingester: Ingester) -> None:
    site.add_noise_events()
    site.create_direct("TaskTemplate", {"code": "tmpl"})
    sync(ingester)
    assert state(store, K_CURSOR) == site.last_event_id()
    with store.engine.connect() as conn:
        stored = {r.event_type for r in conn.execute(sa.select(store.events.c.event_type))}
        registry = conn.execute(sa.select(store.entities).where(store.entities.c.type == "TaskTemplate")).all()
    assert {"Toolkit_App_Startup", "Shotgun_User_Login", "Shotgun_TaskTemplate_New"} <= stored
    assert len(registry) == 1
    assert queued(store) == []


def test_unknown_entity_is_fetched(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "quiet", "project": proj}, events=False)
    sync(ingester)
    site.update_direct("Shot", shot["id"], {"description": "now it talks"})
    sync(ingester)
    assert_equal_to_site(store, site)


def test_retirement_of_uncached_type_keeps_the_registry(site: FakeSite, store: Store, ingester: Ingester) -> None:
    tmpl = site.create_direct("TaskTemplate", {"code": "t"})
    sync(ingester)
    site.delete_direct("TaskTemplate", tmpl["id"])
    sync(ingester)
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(store.entities).where(store.entities.c.type == "TaskTemplate")).one()
    assert row.retired


def test_value_that_cannot_be_applied_queues_a_fetch(store: Store, ingester: Ingester, site: FakeSite) -> None:
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "x", "project": proj})
    sync(ingester)
    bad = {"id": 10_000, "event_type": "Shotgun_Shot_Change", "attribute_name": "sg_cut_in",
           "entity": {"type": "Shot", "id": shot["id"]},
           "meta": {"type": "attribute_change", "attribute_name": "sg_cut_in", "entity_type": "Shot",
                    "entity_id": shot["id"], "field_data_type": "number", "new_value": "not a number"}}
    with store.engine.begin() as conn:
        ingester.apply_event(conn, bad)
    assert queued(store) == [("Shot", shot["id"])]
    ingester.process_fetch_queue()
    assert queued(store) == []
    assert_equal_to_site(store, site)


def test_a_date_time_in_the_event_logs_form_is_stored_in_sgs_wire_form(site: FakeSite, store: Store,
                                                                        ingester: Ingester) -> None:
    """SG's event log writes a date_time as ``2015-07-13 21:54:01 UTC`` (a captured retirement_date
    change), not as the API's ``2015-07-13T21:54:01Z``: stored as it came, a change from empty was
    served as a plain string and compared as text with the API's form. Another form is not stored."""
    proj = make_project(site)
    playlist = site.create_direct("Playlist", {"code": "dailies", "project": proj})
    other = site.create_direct("Playlist", {"code": "review", "project": proj})
    sync(ingester)
    site.update_direct("Playlist", playlist["id"], {"sg_date_and_time": dt.datetime(2026, 1, 5, 10, 30, 0)})
    event = site._state.rows["EventLogEntry"][site.last_event_id()]
    assert event["attribute_name"] == "sg_date_and_time" and event["meta"]["old_value"] is None
    event["meta"]["new_value"] = "2026-01-05 10:30:00 UTC"  # as SG's event log writes a date_time
    site.update_direct("Playlist", other["id"], {"sg_date_and_time": dt.datetime(2026, 1, 6, 9, 0, 0)})
    event = site._state.rows["EventLogEntry"][site.last_event_id()]
    event["meta"]["new_value"] = "Tuesday 9am"  # a form nobody knows: SG's row is read instead
    sync(ingester)
    theirs = {r["code"]: r["sg_date_and_time"] for r in site.find_direct("Playlist", [], ["code", "sg_date_and_time"])}
    assert theirs == {"dailies": "2026-01-05T10:30:00Z", "review": "2026-01-06T09:00:00Z"}
    ours = {r["code"]: r["sg_date_and_time"] for r in replica_read(store, "Playlist", ["code", "sg_date_and_time"], False)}
    assert ours == theirs


def test_applying_each_event_twice_changes_nothing(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    assets = [site.create_direct("Asset", {"code": f"a{i}", "project": proj}) for i in range(2)]
    task = site.create_direct("Task", {"content": "t", "project": proj})
    sync(ingester)
    mark = site.last_event_id()
    site.update_direct("Shot", shot["id"], {"code": "sh2", "assets": assets})
    site.update_direct("Task", task["id"], {"entity": shot})
    site.delete_direct("Asset", assets[0]["id"])
    site.revive_direct("Asset", assets[0]["id"])
    site.update_direct("Shot", shot["id"], {"assets": [assets[1]]}, modes={"assets": "remove"})
    events = ingester.fetch_events(mark, [])  # as polled: with the entity's updated_at/by
    for event in events:
        with store.engine.begin() as conn:
            ingester.apply_event(conn, event)
        before = len(change_rows(store))
        with store.engine.begin() as conn:
            ingester.apply_event(conn, event)
        assert len(change_rows(store)) == before, f"event {event['id']} changed something twice"
    ingester.process_fetch_queue()
    assert_equal_to_site(store, site)
    # and a poll over events already stored applies none of them again
    with store.engine.begin() as conn:
        store_raw(store, conn, events)
    before = len(change_rows(store))
    sync(ingester)
    assert len(change_rows(store)) == before


def test_replay_retirements(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    sync(ingester)
    site.delete_direct("Shot", shot["id"])
    sync(ingester)
    with store.engine.begin() as conn:  # a bug once lost the retirement
        store.set_retired(conn, "Shot", shot["id"], False, "scan")
    assert replay(store, ingester, retirement=True, types={"Shot"}) == 2
    assert_equal_to_site(store, site)


def test_a_replay_never_serves_an_old_state_between_its_chunks(site: FakeSite, store: Store, ingester: Ingester,
                                                               tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/reprocess replays stored events in chunks, each its own transaction, with the
    ingester stopped: a Shot's code set "b" then back to "a" reads "b" once the first chunk
    committed. Proxies (the heartbeat still fresh) must not serve that: they pass until the
    ingester, started again, has caught up."""
    from cache.proxy.service import CacheService

    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    first = site.last_event_id() + 1
    site.update_direct("Shot", shot["id"], {"code": "b"})
    site.update_direct("Shot", shot["id"], {"code": "a"})
    sync(ingester)
    schema_path = tmp_path / "schema.yml"
    schema_path.write_text(cached_schema(site).to_yaml())
    proxy = CacheService(store.engine.url.render_as_string(hide_password=False), schema_path, max_lag=60)
    try:
        assert served_or_passed(proxy, SHOT_CODES) == [{"type": "Shot", "id": shot["id"], "code": "a"}]
        seen = []
        apply_event = ingester.apply_event

        def read_then_apply(conn: Any, event: Any, *args: Any, **kw: Any) -> None:
            seen.append(served_or_passed(proxy, SHOT_CODES))  # the chunks before this one committed
            apply_event(conn, event, *args, **kw)

        monkeypatch.setattr(ingester, "apply_event", read_then_apply)
        assert replay(store, ingester, from_id=first, chunk=1) == 2
        assert seen and all(answer in ("stale", [{"type": "Shot", "id": shot["id"], "code": "a"}])
                            for answer in seen), seen
        monkeypatch.undo()
        sync(ingester)
        assert served_or_passed(proxy, SHOT_CODES) == [{"type": "Shot", "id": shot["id"], "code": "a"}]
    finally:
        proxy.close()


# -- gaps ------------------------------------------------------------------------------
def test_gap_that_fills_late_is_applied(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    sync(ingester)
    held = site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "A"})  # long transaction: its event shows later
    site.update_direct("Shot", shot["id"], {"code": "B"})
    sync(ingester)
    assert state(store, K_CURSOR) == held[0] - 1
    assert state(store, K_HIGH) == site.last_event_id()
    site.release_held()
    sync(ingester)
    assert state(store, K_CURSOR) == state(store, K_HIGH)
    assert_equal_to_site(store, site)  # the late "A" did not overwrite "B"
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(store.events.c.id).where(store.events.c.id == held[0])).first()


def test_gap_that_never_fills_is_given_up(site: FakeSite, store: Store, ingester: Ingester, clock: Clock,
                                          caplog: pytest.LogCaptureFixture) -> None:
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    sync(ingester)
    held = site.hold_event_ids(2)
    site.update_direct("Shot", shot["id"], {"code": "lost"})
    site.drop_held()
    site.update_direct("Shot", shot["id"], {"description": "visible"})
    sync(ingester)
    assert state(store, K_CURSOR) == held[0] - 1
    clock.advance(299)
    sync(ingester)
    assert state(store, K_CURSOR) == held[0] - 1
    clock.advance(2)
    with caplog.at_level(logging.WARNING, logger="sgcache.events"):
        sync(ingester)
    assert state(store, K_CURSOR) == state(store, K_HIGH) == site.last_event_id()
    assert any("gave up on event ids" in r.getMessage() for r in caplog.records)


def test_gap_is_given_up_by_sg_clock_not_the_local_one(site: FakeSite, store: Store, ingester: Ingester,
                                                       clock: Clock) -> None:
    site.set_clock(dt.datetime(2026, 3, 1, 9, 0, 0))  # SG's clock, far from the local one
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    sync(ingester)
    held = site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "lost"})
    site.drop_held()
    site.update_direct("Shot", shot["id"], {"description": "visible"})
    sync(ingester)
    assert state(store, K_CURSOR) == held[0] - 1
    site.advance_clock(seconds=200)
    site.update_direct("Shot", shot["id"], {"sg_cut_in": 1})
    sync(ingester)
    assert state(store, K_CURSOR) == held[0] - 1  # 200 s of SG time: still waiting
    site.advance_clock(seconds=101)
    site.update_direct("Shot", shot["id"], {"sg_cut_in": 2})
    sync(ingester)  # the local clock never moved
    assert state(store, K_CURSOR) == state(store, K_HIGH) == site.last_event_id()
    assert state(store, K_SG_CLOCK) == "2026-03-01T09:05:01Z"


def test_gap_already_old_by_sg_clock_is_given_up_at_once(site: FakeSite, store: Store, ingester: Ingester) -> None:
    site.set_clock(dt.datetime(2026, 3, 1, 9, 0, 0))
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    sync(ingester)
    site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "lost"})
    site.drop_held()
    site.update_direct("Shot", shot["id"], {"description": "old news"})
    site.advance_clock(seconds=400)  # the ingester was down: the event after the gap is 400 s old
    site.update_direct("Shot", shot["id"], {"sg_cut_in": 3})
    result = ingester.poll_once()
    assert result.gaps_expired and not result.gaps_opened
    assert state(store, K_CURSOR) == site.last_event_id()


def give_up_a_long_transaction(site: FakeSite, store: Store, ingester: Ingester) -> tuple[dict[str, Any], list[int]]:
    """A Shot's code set to "late" in a transaction whose event id the ingester gives up (not
    visible gap_timeout after a later event): (the Shot, [that id]), the id still held."""
    site.set_clock(dt.datetime(2026, 3, 1, 9, 0, 0))
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    sync(ingester)
    held = site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "late"})  # a long transaction (created_at now)
    site.update_direct("Shot", shot["id"], {"description": "visible"})
    sync(ingester)
    site.advance_clock(seconds=301)
    site.update_direct("Shot", shot["id"], {"sg_cut_in": 1})
    sync(ingester)
    assert state(store, K_CURSOR) == site.last_event_id()  # given up
    return shot, held


def test_id_visible_after_its_gap_was_given_up_is_swept(site: FakeSite, store: Store, ingester: Ingester) -> None:
    _shot, held = give_up_a_long_transaction(site, store, ingester)
    site.release_held()  # commits after the give-up
    sync(ingester)
    assert replica_read(store, "Shot", ["code"], False)[0]["code"] == "sh1"  # polls never look back
    result = ingester.sweep()
    assert result.swept == held
    ingester.process_fetch_queue()
    assert_equal_to_site(store, site)
    assert replica_read(store, "Shot", ["code"], False)[0]["code"] == "late"
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(store.events.c.id).where(store.events.c.id == held[0])).first()
    assert ingester.sweep().swept == []


def test_an_event_that_fails_to_apply_does_not_keep_the_sweep_from_the_others(
        site: FakeSite, store: Store, ingester: Ingester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two events visible only after their gap was given up, one of which fails to apply: the
    sweep applies the other (and reads the failing one's entity again), as a poll does."""
    site.set_clock(dt.datetime(2026, 3, 1, 9, 0, 0))
    proj = make_project(site)
    shots = [site.create_direct("Shot", {"code": f"sh{i}", "project": proj}) for i in range(2)]
    sync(ingester)
    held = site.hold_event_ids(2)
    site.update_direct("Shot", shots[0]["id"], {"code": "late0"})
    site.update_direct("Shot", shots[1]["id"], {"code": "late1"})
    site.update_direct("Shot", shots[0]["id"], {"description": "visible"})
    sync(ingester)
    site.advance_clock(seconds=301)
    site.update_direct("Shot", shots[0]["id"], {"sg_cut_in": 1})
    sync(ingester)
    assert state(store, K_CURSOR) == site.last_event_id()  # both given up
    site.release_held()
    dispatch = ingester.applier._dispatch

    def failing(conn: Any, event: Any, *args: Any) -> None:
        if event["id"] == held[0]:
            raise RuntimeError("this event cannot be applied")
        dispatch(conn, event, *args)

    monkeypatch.setattr(ingester.applier, "_dispatch", failing)
    assert ingester.sweep().swept == held
    ingester.process_fetch_queue()
    assert_equal_to_site(store, site)
    assert given_up_ids(store) == []


def test_the_sweep_reads_its_whole_window_however_many_events_it_holds(site: FakeSite, store: Store,
                                                                        ingester: Ingester) -> None:
    """An id missing among more events than one read of the window returns (``sweep_limit``; a
    busy site) is still found: the sweep pages through the window by id."""
    ingester.config.sweep_limit = 2
    _shot, held = give_up_a_long_transaction(site, store, ingester)
    with store.engine.begin() as conn:  # not looked for by id any more: only the window finds it
        conn.execute(store.given_up.delete())
    proj = make_project(site)
    for i in range(5):  # more events in the window below the missing id
        site.create_direct("Asset", {"code": f"a{i}", "project": proj})
    site.release_held()
    sync(ingester)
    with store.engine.begin() as conn:
        older = [i for i in stored_event_ids(store, conn) if i < held[0]]
    assert len(older) > 2
    assert ingester.sweep().swept == held
    ingester.process_fetch_queue()
    assert replica_read(store, "Shot", ["code"], False)[0]["code"] == "late"


def test_an_id_visible_after_its_gap_was_given_up_survives_a_restart(site: FakeSite, store: Store,
                                                                     client: SiteClient, ingester: Ingester) -> None:
    """A transaction runs a little longer than the gap timeout: its id is given up, then shows. The
    ingester restarts before its next sweep and is down ten minutes, longer than the sweep window:
    the given-up id, kept in the replica, is still looked for by id and applied."""
    shot, held = give_up_a_long_transaction(site, store, ingester)
    site.advance_clock(seconds=9)
    site.release_held()  # it commits 310 s after it started
    ingester.close()  # restarted before its next sweep; down for ten minutes
    site.advance_clock(seconds=600)
    site.update_direct("Shot", shot["id"], {"sg_cut_in": 2})
    restarted = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01, gap_timeout=300))
    try:
        sync(restarted)
        assert restarted.sweep().swept == held
        restarted.process_fetch_queue()
        sync(restarted)
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(store.events.c.id).where(store.events.c.id == held[0])).first()
        assert_equal_to_site(store, site)
        assert restarted.sweep().swept == [] and given_up_ids(store) == []
    finally:
        restarted.close()


def stored_event_ids(store: Store, conn: Any) -> list[int]:
    return sorted(conn.execute(sa.select(store.events.c.id)).scalars())


def given_up_ids(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return sorted(r.id for r in conn.execute(sa.select(store.given_up.c.id)))


def test_given_up_ids_are_looked_for_a_bounded_time_and_number(site: FakeSite, store: Store,
                                                                client: SiteClient) -> None:
    """Given-up ids are kept up to given_up_max (the lowest dropped first) and looked for by every
    sweep until one that asks SG given_up_keep seconds (SG's clock) after they were given up."""
    site.set_clock(dt.datetime(2026, 3, 1, 9, 0, 0))
    prime(store, client)
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01, gap_timeout=300,
                                               given_up_keep=3600, given_up_max=2))
    try:
        proj = make_project(site)
        shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
        sync(ing)
        held = site.hold_event_ids(3)
        for i in range(3):
            site.update_direct("Shot", shot["id"], {"sg_cut_in": i})
        site.drop_held()  # rolled back: never shows
        site.update_direct("Shot", shot["id"], {"description": "visible"})
        sync(ing)
        site.advance_clock(seconds=301)
        site.update_direct("Shot", shot["id"], {"sg_cut_in": 10})
        result = ing.poll_once()
        assert result.gaps_expired == held and result.given_up_dropped == held[:1]
        assert given_up_ids(store) == held[1:]
        site.advance_clock(seconds=3599)
        site.update_direct("Shot", shot["id"], {"sg_cut_in": 11})
        sync(ing)
        assert ing.sweep().given_up_dropped == [] and given_up_ids(store) == held[1:]
        site.advance_clock(seconds=2)
        site.update_direct("Shot", shot["id"], {"sg_cut_in": 12})
        sync(ing)
        assert ing.sweep().given_up_dropped == held[1:]
        assert given_up_ids(store) == []
    finally:
        ing.close()


def test_a_transaction_open_when_the_prime_starts_is_not_lost(site: FakeSite, store: Store,
                                                              client: SiteClient) -> None:
    """SG takes an event id at insert and shows it at commit: when the prime reads the newest
    event, a transaction still open holds a lower id. It commits after the prime read its row, so
    the replica's event stream must start below that id (neither polls nor sweeps look below)."""
    from cache.scan.scanner import Scanner

    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    held = site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "late"})  # in a transaction still open:
    site._state.rows["Shot"][shot["id"]]["code"] = "sh1"  # ... its write is not visible yet
    site.create_direct("Sequence", {"code": "SQ01", "project": proj})  # visible, ids above the held one
    assert site.last_event_id() > held[0]
    Scanner(store, client).prime(sorted(store.schema.entities))
    site._state.rows["Shot"][shot["id"]]["code"] = "late"  # the transaction commits
    site.release_held()
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01, gap_timeout=300))
    try:
        sync(ing)
        assert replica_read(store, "Shot", ["code"], False)[0]["code"] == "late"
        assert state(store, K_CURSOR) == site.last_event_id()
    finally:
        ing.close()


def test_an_ingester_without_a_cursor_starts_below_ids_not_visible_yet(site: FakeSite, store: Store,
                                                                       client: SiteClient) -> None:
    """The ingester's own first cursor (no prime recorded one) starts below an id still invisible,
    as the prime's does: the held event is applied once it commits."""
    from cache.scan.scanner import Scanner

    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    held = site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "late"})
    site._state.rows["Shot"][shot["id"]]["code"] = "sh1"
    site.create_direct("Sequence", {"code": "SQ01", "project": proj})
    scanner = Scanner(store, client)
    for entity_type in sorted(store.schema.entities):
        scanner.full_scan(entity_type)  # no cursor recorded
    assert state(store, K_CURSOR) is None
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01, gap_timeout=300))
    try:
        sync(ing)
        assert state(store, K_CURSOR) == held[0] - 1  # waiting for it
        site._state.rows["Shot"][shot["id"]]["code"] = "late"
        site.release_held()
        sync(ing)
        assert replica_read(store, "Shot", ["code"], False)[0]["code"] == "late"
        assert state(store, K_CURSOR) == site.last_event_id()
    finally:
        ing.close()


def test_run_sweeps_every_n_polls(site: FakeSite, store: Store, client: SiteClient) -> None:
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01, sweep_every=3))
    calls: list[int] = []
    ing.sweep = lambda: calls.append(ing._polls) or None  # type: ignore[method-assign]
    original = ing.poll_once

    def poll() -> Any:
        if ing._polls >= 7:
            ing.stop()
        return original()

    ing.poll_once = poll  # type: ignore[method-assign]
    ing.run(follow=True)
    ing.close()
    assert calls == [3, 6]


def test_full_batches_never_stall_behind_a_gap(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    sync(ingester)
    site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "held"})
    for i in range(200):  # 4 full batches of 50 behind the gap
        site.update_direct("Shot", shot["id"], {"sg_cut_in": i})
    polls = sync(ingester)
    assert polls <= 6
    assert state(store, K_HIGH) == site.last_event_id()
    site.release_held()
    sync(ingester)
    assert_equal_to_site(store, site)


# -- schema events ----------------------------------------------------------------------
def test_schema_change_unprimes_or_refetches_the_field(site: FakeSite, store: Store, ingester: Ingester) -> None:
    proj = make_project(site)
    site.create_direct("Shot", {"code": "sh1", "project": proj, "sg_cut_in": 5, "sg_shot_type": "Regular"}
                       if "Regular" in (site._prop("Shot", "sg_shot_type", "valid_values") or [])
                       else {"code": "sh1", "project": proj, "sg_cut_in": 5})
    sync(ingester)
    site.change_field_type("Shot", "sg_cut_in", "text")
    values = site._prop("Shot", "sg_shot_type", "valid_values") or []
    site.change_field_type("Shot", "sg_shot_type", "list", valid_values=[*values, "Extra"])
    sync(ingester)
    with store.engine.connect() as conn:
        primed = store.primed_fields(conn)
        assert state(store, "schema_pending") is None
    assert "sg_cut_in" not in primed["Shot"]  # type changed: reads pass until the schema file follows
    assert "sg_shot_type" in primed["Shot"]  # same type: re-read, then served again
    assert_equal_to_site(store, site)


def test_fetch_after_a_field_type_change_does_not_drop_new_rows(site: FakeSite, store: Store,
                                                                ingester: Ingester) -> None:
    """Shot.sg_cut_in becomes a text field on the site: it is un-primed and left out of fetches, so a
    Shot created afterwards (a text value there) still reaches the replica and leaves the queue."""
    proj = make_project(site)
    site.create_direct("Shot", {"code": "sh1", "project": proj, "sg_cut_in": 5})
    sync(ingester)
    site.change_field_type("Shot", "sg_cut_in", "text")
    sync(ingester)
    with store.engine.connect() as conn:
        assert "sg_cut_in" not in store.primed_fields(conn)["Shot"]
    site.create_direct("Shot", {"code": "sh2", "project": proj, "sg_cut_in": "1001-1100"})
    sync(ingester)
    assert queued(store) == []
    assert [r["code"] for r in replica_read(store, "Shot", ["code"], False)] == ["sh1", "sh2"]


def test_new_rows_of_a_type_that_lost_a_field_still_reach_the_replica(site: FakeSite, store: Store,
                                                                      ingester: Ingester) -> None:
    """Asset.description deleted on the site (no event), noticed at the next schema re-read: a new
    Asset's fetch lacks only that (un-primed) field, so its row is stored, not dropped unqueued."""
    proj = make_project(site)
    site.create_direct("Asset", {"code": "a0", "project": proj})
    sync(ingester)
    site.remove_field("Asset", "description")  # no event
    site.change_field_type("Shot", "sg_cut_out", "text")  # any schema event: the schema is re-read
    sync(ingester)
    assert ("Asset", "description") in ingester.missing_fields
    site.create_direct("Asset", {"code": "a1", "project": proj})
    sync(ingester)
    assert queued(store) == []
    assert [r["code"] for r in replica_read(store, "Asset", ["code"], False)] == ["a0", "a1"]


def test_a_fetched_row_the_replica_cannot_store_stays_queued(site: FakeSite, store: Store,
                                                             ingester: Ingester) -> None:
    """A row SG sends that the write path refuses (a value its column cannot take) is not dropped
    from the queue: reads of its type keep passing (pending-fetch) instead of missing it."""
    proj = make_project(site)
    sync(ingester)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj, "sg_cut_in": 5})
    ingester.poll_once()
    sg = ingester.fetcher.sg
    assert sg is not None
    find = sg.find

    def bad_value(entity_type: str, filters: Any, fields: list[str] | None = None, **kw: Any) -> Any:
        return [{**r, "sg_cut_in": "not a number"} for r in find(entity_type, filters, fields, **kw)]

    ingester.fetcher.sg = type("Client", (), {"find": staticmethod(bad_value)})()
    ingester.process_fetch_queue()
    assert queued(store) == [("Shot", shot["id"])]
    assert replica_read(store, "Shot", ["code"], False) == []
    ingester.fetcher.sg = sg
    ingester.process_fetch_queue()
    assert queued(store) == []
    assert [r["code"] for r in replica_read(store, "Shot", ["code"], False)] == ["sh1"]


def test_rows_that_cannot_be_stored_never_keep_other_rows_from_their_fetch(site: FakeSite, store: Store,
                                                                           ingester: Ingester) -> None:
    """More queued rows that can never be stored than one pass of the queue takes (Assets whose
    values the replica refuses) must not keep the others from being fetched: other types' rows
    (a Shot) and later rows of the same type (an Asset SG sends a good value for)."""
    proj = make_project(site)
    sync(ingester)
    stuck = [site.create_direct("Asset", {"code": f"bad{i}", "project": proj})["id"] for i in range(6)]
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    ingester.poll_once()
    sg = ingester.fetcher.sg
    assert sg is not None
    find = sg.find

    def bad_assets(entity_type: str, filters: Any, fields: list[str] | None = None, **kw: Any) -> Any:
        rows = find(entity_type, filters, fields, **kw)
        return [{**r, "code": 5} if str(r.get("code", "")).startswith("bad") else r for r in rows]

    ingester.fetcher.sg = type("Client", (), {"find": staticmethod(bad_assets)})()
    good = site.create_direct("Asset", {"code": "good", "project": proj})
    ingester.poll_once()
    for _ in range(4):
        ingester.fetcher.process(limit=5)
    assert [r["code"] for r in replica_read(store, "Shot", ["code"], False)] == ["sh1"]
    assert [r["code"] for r in replica_read(store, "Asset", ["code"], False)] == ["good"]
    assert sorted(queued(store)) == [("Asset", i) for i in stuck]
    assert shot["id"] and good["id"]


def test_a_row_with_text_the_database_cannot_hold_does_not_keep_its_neighbours_out(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """SG sends a Shot whose code holds a NUL character (PostgreSQL's text cannot hold it) with
    another Shot in the same fetch: the other is stored; the one that cannot be stays queued
    (reads of Shot pass) instead of failing the fetch of both on every poll."""
    proj = make_project(site)
    sync(ingester)
    bad = site.create_direct("Shot", {"code": "nul\x00here", "project": proj})
    good = site.create_direct("Shot", {"code": "fine", "project": proj})
    ingester.poll_once()
    ingester.process_fetch_queue()
    codes = [r["code"] for r in replica_read(store, "Shot", ["code"], False)]
    if store.dialect.stores_nul:
        assert codes == ["nul\x00here", "fine"] and queued(store) == []
    else:
        assert codes == ["fine"] and queued(store) == [("Shot", bad["id"])]
    assert good["id"]


def test_a_field_deleted_on_the_site_does_not_stall_the_fetches_of_other_types(site: FakeSite, store: Store,
                                                                               ingester: Ingester) -> None:
    """A cached field deleted on the site (SG logs no event): SG refuses every fetch of that type.
    The other types are fetched all the same, and the refusal asks for a schema re-read, which
    leaves the field out so the type's fetches succeed again."""
    proj = make_project(site)
    sync(ingester)
    site.remove_field("Asset", "description")
    asset = site.create_direct("Asset", {"code": "a1", "project": proj})
    site.create_direct("Shot", {"code": "sh1", "project": proj})
    ingester.poll_once()
    ingester.process_fetch_queue()  # what Ingester.run does: poll, fetch, schema
    assert queued(store) == [("Asset", asset["id"])]
    assert [r["code"] for r in replica_read(store, "Shot", ["code"], False)] == ["sh1"]
    ingester.process_schema()
    assert ("Asset", "description") in ingester.missing_fields
    ingester.process_fetch_queue()
    assert queued(store) == []
    assert [r["code"] for r in replica_read(store, "Asset", ["code"], False)] == ["a1"]


def test_a_fetch_never_overwrites_a_write_the_proxy_learned_meanwhile(site: FakeSite, store: Store,
                                                                    ingester: Ingester, service: Any) -> None:
    """A queued Shot (just revived) is read by the fetch (code "a"); before the fetch writes it, a
    client updates it through the proxy to "b" and the proxy learns SG's answer. The fetch does not
    write its older row over the learned one: it reads the Shot again, and reads answer "b"."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    site.delete_direct("Shot", shot["id"])
    site.revive_direct("Shot", shot["id"])
    ingester.poll_once()  # the Revival: the Shot is queued for a fetch
    assert ("Shot", shot["id"]) in queued(store)
    sg = ingester.fetcher.sg
    assert sg is not None
    sg_find = sg.find
    done: list[int] = []

    def fetch_then_proxy_write(entity_type: str, filters: Any, fields: list[str] | None = None,
                               **kw: Any) -> Any:
        rows = sg_find(entity_type, filters, fields, **kw)
        if entity_type == "Shot" and not done:
            done.append(1)  # SG read by the fetch; now the client's update through a proxy
            params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "b"}]}
            mark = service.write_mark()
            answer = site._direct("update", params, True)
            assert service.learn("update", params, answer, mark) == []
        return rows

    ingester.fetcher.sg = type("Client", (), {"find": staticmethod(fetch_then_proxy_write)})()
    ingester.process_fetch_queue()
    assert done
    assert queued(store) == []
    read = {"type": "Shot", "return_fields": ["code"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    assert service.read(read)["entities"] == [{"type": "Shot", "id": shot["id"], "code": "b"}]


def test_a_learn_given_up_on_never_stores_its_answer_over_a_newer_one(site: FakeSite, store: Store,
                                                                      ingester: Ingester, service: Any) -> None:
    """A client sets a Shot's code "b" through the proxy, then someone else sets "c". The proxy
    learns "b" while an ingester poll holds the write lock: it gives up after its wait (the client
    has SG's answer at once) and defers the write; the poll applies both events. The learn given up
    on goes on and takes the lock after the poll: the ingester moved since the write's mark, so it
    stores nothing over "c" and marks the fields pending instead."""
    from cache.errors import Passthrough

    from .wait import wait_until

    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    service.learner.wait = 0.3
    params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "b"}]}
    mark = service.write_mark()
    answer = site._direct("update", params, True)
    site.update_direct("Shot", shot["id"], {"code": "c"})
    with store.write_engine.begin() as conn:  # a poll holds the write lock ...
        store.dialect.lock_writes(conn)
        started = time.monotonic()
        assert service.learn("update", params, answer, mark) == []
        assert time.monotonic() - started < 5, "learning waited for the write lock"
        assert not service.learner.all_recorded()  # deferred: this proxy's reads pass until it is marked
        # ... and applies both events
        store.write_entities(conn, "Shot", [{"id": shot["id"], "code": "c"}], "ingest")
        store.set_state(conn, K_HIGH, site.last_event_id())

    def marked() -> bool:
        with store.engine.connect() as conn:
            return ("Shot", "code") in {(r.entity_type, r.field_name) for r in conn.execute(sa.select(store.pending))}

    wait_until(marked, 30, "the learn given up on to mark the fields it may change")
    assert [r["code"] for r in replica_read(store, "Shot", ["code"], False) if r["id"] == shot["id"]] == ["c"]
    read = {"type": "Shot", "return_fields": ["code"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    with pytest.raises(Passthrough) as passed:
        service.read(read)
    assert passed.value.reason == "pending-write"


# -- leadership --------------------------------------------------------------------------
def test_second_ingester_on_sqlite_refuses(backend: str, store: Store, client: SiteClient) -> None:
    if backend != "sqlite":
        pytest.skip("SQLite file lock")
    first = Ingester(store, client)
    second = Ingester(store, client)
    try:
        assert first.become_leader(wait=False)
        with pytest.raises(LockHeld, match="already runs"):
            second.become_leader(wait=False)
    finally:
        first.close()
        second.close()


def test_second_ingester_on_postgresql_waits(backend: str, store: Store, client: SiteClient) -> None:
    if backend != "postgresql":
        pytest.skip("PostgreSQL advisory lock")
    first = Ingester(store, client)
    second = Ingester(store, client)
    try:
        assert first.become_leader(wait=False)
        assert not second.become_leader(wait=False)
        first.close()
        assert second.become_leader(wait=False)
    finally:
        first.close()
        second.close()


# -- the heartbeat says the replica is caught up, not only that the ingester runs ----------
def test_heartbeat_moves_only_when_a_poll_reaches_the_end_of_the_stream(site: FakeSite, store: Store,
                                                                      client: SiteClient, clock: Clock) -> None:
    """A backlog (after an outage or a restore) applied a full batch at a time leaves the heartbeat as
    it was: the proxy must not serve a replica that is behind SG because its ingester is busy."""
    prime(store, client)
    ing = Ingester(store, client, IngestConfig(batch=3, catch_up_batch=4, poll_interval=0.01, gap_timeout=300),
                   clock=clock)
    try:
        ing.poll_once()
        beat = state(store, K_HEARTBEAT)
        assert beat, "an idle poll reached the end of the stream"
        proj = make_project(site)
        for i in range(7):
            site.create_direct("Sequence", {"code": f"SQ{i:02d}", "project": proj})
        full_polls = 0
        while (last := ing.poll_once()).full:
            full_polls += 1
            assert state(store, K_HEARTBEAT) == beat
            assert state(store, K_HIGH) < site.last_event_id() or full_polls > 3
        assert full_polls >= 2
        assert state(store, K_HIGH) == site.last_event_id()
        assert state(store, K_HEARTBEAT) != beat and state(store, K_HEARTBEAT) == last.caught_up_at
    finally:
        ing.close()



def test_the_heartbeat_is_stamped_with_the_database_s_clock(site: FakeSite, store: Store, client: SiteClient,
                                                             clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxies age the heartbeat by the database server's clock (cache/proxy/service.py), so
    the ingester stamps it with that clock, not its own host's: the time it asked SG, moved onto the
    database's clock by the time elapsed since (a monotonic clock). Here the database's clock is ten
    minutes ahead of this host's."""
    import cache.replica.pending as pendingmod

    prime(store, client)
    monkeypatch.setattr(pendingmod, "db_clock", lambda conn: time.time() + 600)
    ing = Ingester(store, client, IngestConfig(poll_interval=0.01), clock=clock)
    try:
        before = time.time()
        result = ing.poll_once()
        after = time.time()
        beat = parse_wire_dt(state(store, K_HEARTBEAT)).replace(tzinfo=dt.UTC).timestamp()
        assert before + 600 - 0.5 <= beat <= after + 600, (before, beat, after)
        assert state(store, K_HEARTBEAT) == result.caught_up_at
    finally:
        ing.close()

def test_a_backlog_is_read_in_catch_up_batches_until_the_end(site: FakeSite, store: Store,
                                                               client: SiteClient, clock: Clock) -> None:
    """After a full poll the ingester asks for catch_up_batch events a poll (fewer, larger transactions
    while behind); once a poll reaches the end of the stream it asks for batch again."""
    limits: list[int] = []
    find = client.find

    def recording_find(entity_type: str, filters: Any, fields: list[str] | None = None, **kwargs: Any) -> Any:
        if entity_type == "EventLogEntry" and kwargs.get("limit"):
            limits.append(kwargs["limit"])
        return find(entity_type, filters, fields, **kwargs)

    client.find = recording_find  # type: ignore[method-assign]
    prime(store, client)
    ing = Ingester(store, client, IngestConfig(batch=2, catch_up_batch=5, poll_interval=0.01, gap_timeout=300),
                   clock=clock)
    try:
        proj = make_project(site)
        for i in range(11):
            site.create_direct("Sequence", {"code": f"SQ{i:02d}", "project": proj})
        results = [ing.poll_once()]
        while results[-1].full:
            results.append(ing.poll_once())
        ing.poll_once()  # at the end: a normal poll again
        ing.process_fetch_queue()  # the new rows (as the run loop does after each poll)
        assert limits[0] == 2 and set(limits[1:len(results)]) == {5} and limits[-1] == 2, limits
        assert [r.received for r in results[1:-1]] == [5] * (len(results) - 2)
        assert state(store, K_HIGH) == site.last_event_id()
        assert_equal_to_site(store, site)
    finally:
        ing.close()
    assert IngestConfig(batch=800, catch_up_batch=300).catch_up_batch == 800  # never below batch


def test_a_poll_never_overwrites_a_proxy_write_learnt_after_it_loaded_the_rows(
        site: FakeSite, store: Store, ingester: Ingester, service: Any, backend: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone sets a Shot's code "a" -> "b" (E1); the poll loads the row ("a"); a client sets "c"
    through the proxy meanwhile. The poll's old-value guard compares E1 with the row it loaded: on
    PostgreSQL it took the write lock only at its flush, so the proxy stored "c" in between and E1's
    "b" overwrote it (the writer read "b" back until the next poll). With the lock taken before the
    load, the proxy's learning waits for the poll, sees the ingester moved, and marks instead.
    (SQLite: the sidecars' write transactions begin IMMEDIATE, a writer's store, which this
    fixture's is not.)"""
    if backend != "postgresql":
        pytest.skip("PostgreSQL: the write lock is an advisory lock taken in the transaction")
    import threading

    import cache.ingest.batch as batchmod
    from cache.errors import Passthrough
    from cache.replica.writes import WriteBatch

    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    site.update_direct("Shot", shot["id"], {"code": "b"})  # E1, someone else
    writers: list[threading.Thread] = []

    def client_writes_c() -> None:
        params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "c"}]}
        mark = service.write_mark()
        service.learn("update", params, site._direct("update", params, True), mark)

    class Racing(WriteBatch):
        def load(self, keys: Any) -> None:
            super().load(keys)
            if not writers:  # the poll has loaded the rows: the client's write lands now
                writers.append(threading.Thread(target=client_writes_c))
                writers[0].start()
                writers[0].join(1.0)  # it waits for the poll's lock (before: it stored "c" at once)

    monkeypatch.setattr(batchmod, "WriteBatch", Racing)
    ingester.poll_once()
    writers[0].join(30)
    assert not writers[0].is_alive()
    read = {"type": "Shot", "return_fields": ["code"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    assert site.find_direct("Shot", [], ["code"])[0]["code"] == "c"
    try:
        served = service.read(read)["entities"]
    except Passthrough as exc:
        assert exc.reason == "pending-write"  # the learnt write marked instead: SG answers
    else:
        assert served == [{"type": "Shot", "id": shot["id"], "code": "c"}]


# -- a proxy's learnt writes and the events that come after them ---------------------------
SHOT_CODES = {"type": "Shot", "return_fields": ["code"], "return_only": "active",
              "filters": {"logical_operator": "and", "conditions": []},
              "paging": {"entities_per_page": 10, "current_page": 1}}


def served_or_passed(service: Any, read: dict[str, Any]) -> list[dict[str, Any]] | str:
    """What the proxy answers from the replica, or the reason it passes."""
    from cache.errors import Passthrough

    service.invalidate()  # the replica's state as it is now, not as cached for a second
    try:
        return service.read(read)["entities"]
    except Passthrough as exc:
        return exc.reason


def test_a_value_set_back_through_the_proxy_is_not_undone_by_an_older_event(
        site: FakeSite, store: Store, ingester: Ingester, service: Any) -> None:
    """Someone sets a Shot's code "a" -> "b" (E1, not polled yet); a client sets it back to "a"
    through the proxy (E2, not visible yet). The replica held "a" all along, so E1's old value
    matched and E1 was applied: the writer read "b" back, which SG no longer had, until E2 came.
    An event on a row a proxy wrote since the ingester last caught up is applied only where it
    changes nothing; otherwise SG's row is read."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    site.update_direct("Shot", shot["id"], {"code": "b"})  # E1, someone else
    site.hold_event_ids(1)  # the proxied write's own event commits late
    params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "a"}]}
    mark = service.write_mark()
    assert service.learn("update", params, site._direct("update", params, True), mark) == []
    ingester.poll_once()  # E1 alone
    assert served_or_passed(service, SHOT_CODES) in ([{"type": "Shot", "id": shot["id"], "code": "a"}],
                                                     "pending-fetch")
    ingester.process_fetch_queue()
    assert served_or_passed(service, SHOT_CODES) == [{"type": "Shot", "id": shot["id"], "code": "a"}]
    site.release_held()
    sync(ingester)
    assert served_or_passed(service, SHOT_CODES) == [{"type": "Shot", "id": shot["id"], "code": "a"}]
    assert_equal_to_site(store, site)


def test_a_link_removed_through_the_proxy_is_not_added_back_by_an_older_event(
        site: FakeSite, store: Store, ingester: Ingester, service: Any) -> None:
    """The same for a multi_entity list: someone adds a Shot to a Sequence (E1, not polled yet);
    a client removes it through the proxy. E1's "added" must not put it back in the replica."""
    proj = make_project(site)
    seq = site.create_direct("Sequence", {"code": "sq", "project": proj})
    shot = site.create_direct("Shot", {"code": "s1", "project": proj})
    sync(ingester)
    link = {"type": "Shot", "id": shot["id"]}
    site.update_direct("Sequence", seq["id"], {"shots": [link]})  # E1 (and its backref), someone else
    site.hold_event_ids(4)
    params = {"type": "Sequence", "id": seq["id"], "fields": [{"field_name": "shots", "value": []}]}
    mark = service.write_mark()
    service.learn("update", params, site._direct("update", params, True), mark)
    ingester.poll_once()
    read = {"type": "Sequence", "return_fields": ["shots"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    assert served_or_passed(service, read) in ([{"type": "Sequence", "id": seq["id"], "shots": []}],
                                               "pending-fetch", "pending-write")
    ingester.process_fetch_queue()
    assert served_or_passed(service, read) in ([{"type": "Sequence", "id": seq["id"], "shots": []}],
                                               "pending-write")
    other_side = {"type": "Shot", "return_fields": ["sg_sequence"], "return_only": "active",
                  "filters": {"logical_operator": "and", "conditions": []},
                  "paging": {"entities_per_page": 10, "current_page": 1}}
    assert served_or_passed(service, other_side) in ([{"type": "Shot", "id": shot["id"], "sg_sequence": None}],
                                                     "pending-write")
    site.release_held()
    sync(ingester)
    assert_equal_to_site(store, site)


def test_an_entity_revived_through_the_proxy_is_not_retired_again_by_an_older_event(
        site: FakeSite, store: Store, ingester: Ingester, service: Any) -> None:
    """Someone deletes a Shot (not polled yet); a client revives it through the proxy. The older
    Retirement must not hide the Shot again until the Revival's event comes."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    site.delete_direct("Shot", shot["id"])
    site.hold_event_ids(2)
    params = {"type": "Shot", "id": shot["id"]}
    service.learn("revive", params, site._direct("revive", params, True), service.write_mark())
    ingester.poll_once()
    assert served_or_passed(service, SHOT_CODES) in ([{"type": "Shot", "id": shot["id"], "code": "a"}],
                                                     "pending-fetch", "pending-write")
    ingester.process_fetch_queue()
    assert served_or_passed(service, SHOT_CODES) in ([{"type": "Shot", "id": shot["id"], "code": "a"}],
                                                     "pending-write")
    site.release_held()
    sync(ingester)
    assert_equal_to_site(store, site)


def test_the_events_of_a_proxied_write_are_applied_without_a_fetch_once_settled(
        site: FakeSite, store: Store, ingester: Ingester, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxied write's own events change nothing in the replica (no fetch); once a poll that
    reached the end of the log started well after the write, later events on the row apply as
    events again (no fetch for ever after one write)."""
    from cache.replica import pending
    from cache.replica.statekeys import CHANGES_SETTLED

    monkeypatch.setattr(pending, "MARGIN", 0.0)
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "b"}]}
    service.learn("update", params, site._direct("update", params, True), service.write_mark())
    assert [r.field_name for r in change_rows(store, source="proxy")] == ["code", "*"]
    ingester.poll_once()  # the write's own event: the row holds its new value already
    assert queued(store) == []
    ingester.poll_once()
    ingester.poll_once()
    assert state(store, CHANGES_SETTLED) >= max(r.seq for r in change_rows(store, source="proxy"))
    site.update_direct("Shot", shot["id"], {"code": "c"})
    ingester.poll_once()
    assert queued(store) == []  # applied as an event
    assert served_or_passed(service, SHOT_CODES) == [{"type": "Shot", "id": shot["id"], "code": "c"}]


def test_two_writes_answered_in_the_opposite_order_to_sgs_never_leave_the_older_value(
        site: FakeSite, store: Store, ingester: Ingester, service: Any) -> None:
    """Two clients update one Shot at once: SG applies "x" then "y", but "y"'s answer reaches the
    proxy first. The answer learnt last ("x") is older than the replica: it is not stored; the
    written fields pass until the ingester has both writes, then the replica holds SG's "y"."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    first = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "x"}]}
    second = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "y"}]}
    mark_first = service.write_mark()
    mark_second = service.write_mark()
    answer_first = site._direct("update", first, True)
    answer_second = site._direct("update", second, True)
    service.learn("update", second, answer_second, mark_second)
    service.learn("update", first, answer_first, mark_first)
    assert served_or_passed(service, SHOT_CODES) in ([{"type": "Shot", "id": shot["id"], "code": "y"}],
                                                     "pending-write")
    sync(ingester)
    sync(ingester)
    assert served_or_passed(service, SHOT_CODES) in ([{"type": "Shot", "id": shot["id"], "code": "y"}],
                                                     "pending-write")
    assert_equal_to_site(store, site)


def test_the_change_log_is_pruned_of_what_the_ingester_is_past(
        site: FakeSite, store: Store, ingester: Ingester, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The change log grows with every write; the records the ingester has caught up past and that
    are older than ``keep`` are deleted by the polls that reach the end of the log (never the
    newer ones, nor the newest one)."""
    from cache.replica import pending
    from cache.replica.statekeys import CHANGES_SETTLED

    monkeypatch.setattr(pending, "MARGIN", 0.0)
    ingester.settling.keep = 0.0
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    assert change_rows(store)
    for code in ("b", "c"):
        params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": code}]}
        service.learn("update", params, site._direct("update", params, True), service.write_mark())
    newest = max(r.seq for r in change_rows(store))
    for _ in range(3):
        ingester.poll_once()
    settled = state(store, CHANGES_SETTLED)
    assert settled >= newest
    rows = change_rows(store)
    left = [r.seq for r in rows if r.seq <= settled]
    # everything at or below it went, but the newest record (the numbering goes on): the polls may
    # have written newer ones (the events of the two updates), so the newest is read after them
    assert left in ([], [max(r.seq for r in rows)]), (left, newest)
    params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "d"}]}
    service.learn("update", params, site._direct("update", params, True), service.write_mark())
    assert [r.field_name for r in change_rows(store, source="proxy") if r.seq > settled] == ["code", "*"]  # kept


def test_a_value_set_back_through_the_proxy_after_the_change_log_was_pruned_empty(
        site: FakeSite, store: Store, ingester: Ingester, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet hour: the pruning deletes every record of the change log. The records written after
    it must still number above ``changes_settled``: SQLite numbers an ``INTEGER PRIMARY KEY`` from
    the largest one left (1 in an empty table), and a proxy's write then counted as settled at once,
    so the older event of :func:`test_a_value_set_back_through_the_proxy_is_not_undone_by_an_older_event`
    was applied over it (the replica answered "b", SG had "a")."""
    from cache.replica import pending
    from cache.replica.statekeys import CHANGES_SETTLED

    monkeypatch.setattr(pending, "MARGIN", 0.0)
    ingester.settling.keep = 0.0
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    for _ in range(3):
        ingester.poll_once()
    assert state(store, CHANGES_SETTLED) and len(change_rows(store)) <= 1  # pruned (all but the newest)
    site.update_direct("Shot", shot["id"], {"code": "b"})  # E1, someone else
    site.hold_event_ids(1)  # the proxied write's own event commits late
    params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "a"}]}
    assert service.learn("update", params, site._direct("update", params, True), service.write_mark()) == []
    assert all(r.seq > state(store, CHANGES_SETTLED) for r in change_rows(store, source="proxy"))
    ingester.poll_once()  # E1 alone
    ingester.process_fetch_queue()
    assert served_or_passed(service, SHOT_CODES) == [{"type": "Shot", "id": shot["id"], "code": "a"}]
    site.release_held()
    sync(ingester)
    assert_equal_to_site(store, site)


def test_applied_events_older_than_events_keep_are_pruned(site: FakeSite, store: Store, ingester: Ingester) -> None:
    """sgcache_events keeps the applied events ``events_keep`` seconds of SG's time: a poll that
    reaches the end of the log deletes the older ones (it grew with SG's event log for ever)."""
    site.set_clock(dt.datetime(2026, 3, 1, 9, 0, 0))
    proj = make_project(site)
    site.create_direct("Shot", {"code": "old", "project": proj})
    sync(ingester)
    with store.engine.connect() as conn:
        old = stored_event_ids(store, conn)
    assert old
    site.advance_clock(seconds=31 * 86400)
    site.create_direct("Shot", {"code": "new", "project": proj})
    ingester.retention._next = 0.0  # due now (at most every PRUNE_EVERY seconds)
    sync(ingester)
    with store.engine.connect() as conn:
        kept = stored_event_ids(store, conn)
    assert kept and not set(kept) & set(old)
    assert min(kept) > max(old)
    assert_equal_to_site(store, site)
    ingester.retention._next = 0.0
    ingester.retention.keep = 0  # 0: keep all
    site.advance_clock(seconds=60 * 86400)
    site.create_direct("Shot", {"code": "newer", "project": proj})
    sync(ingester)
    with store.engine.connect() as conn:
        assert set(kept) < set(stored_event_ids(store, conn))


def test_a_field_changed_while_the_database_failed_is_unprimed_once_it_answers(
        site: FakeSite, store: Store, ingester: Ingester, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client deletes a field through the proxy (schema_field_delete: SG logs no event) while the
    replica's database fails to take the un-priming: the field must not be served meanwhile, and
    once the database answers it is un-primed (and named for the ingester's schema re-read); it
    was only logged, and the field SG no longer has went on being served."""
    from cache.replica.statekeys import SCHEMA_PENDING

    proj = make_project(site)
    site.create_direct("Shot", {"code": "s1", "project": proj, "sg_cut_in": 5})
    sync(ingester)
    read = {"type": "Shot", "return_fields": ["sg_cut_in"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    assert isinstance(served_or_passed(service, read), list)

    class Down:
        def begin(self) -> Any:
            raise sa.exc.OperationalError("UPDATE", {}, Exception("the database is down"))

    monkeypatch.setattr(service.store, "_write_engine", Down())
    service.field_changed("Shot", "sg_cut_in")
    assert isinstance(served_or_passed(service, read), str)  # passes while it is not recorded
    monkeypatch.undo()
    service.breaker.open_until = 0.0
    assert isinstance(served_or_passed(service, read), str)  # recorded now: un-primed, marked
    with store.engine.connect() as conn:
        primed = conn.execute(sa.select(store.fields.c.primed).where(
            (store.fields.c.entity_type == "Shot") & (store.fields.c.field_name == "sg_cut_in"))).scalar()
        assert primed is False or primed == 0
        assert "sg_cut_in" in (store.get_state(conn, SCHEMA_PENDING) or [])


def test_a_field_re_read_after_a_schema_event_never_overwrites_a_write_the_proxy_learned_meanwhile(
        site: FakeSite, store: Store, ingester: Ingester, service: Any) -> None:
    """A schema event names Shot.code (same type): the ingester reads the field of every Shot from
    SG again. A client sets a Shot's code "b" through the proxy after that read and before it is
    written: the re-read must not store its older "a" over "b" and serve the field again with it."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    site.change_field_type("Shot", "code", "text")  # DisplayColumn Changes naming "code"
    ingester.poll_once()
    assert state(store, "schema_pending")
    client = ingester.schema_refresh.sg
    assert client is not None
    done: list[int] = []

    def read_then_proxy_write(entity_type: str, filters: Any, fields: list[str] | None = None, **kw: Any) -> Any:
        rows = client.find(entity_type, filters, fields, **kw)
        if entity_type == "Shot" and fields == ["id", "code"] and not done:
            done.append(1)  # the field re-read has SG's rows; now a client's update through a proxy
            params = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "b"}]}
            mark = service.write_mark()
            assert service.learn("update", params, site._direct("update", params, True), mark) == []
        return rows

    ingester.schema_refresh.sg = type("Client", (), {"find": staticmethod(read_then_proxy_write),
                                                     "schema_read": staticmethod(client.schema_read)})()
    ingester.process_schema()
    assert done
    assert served_or_passed(service, SHOT_CODES) in ([{"type": "Shot", "id": shot["id"], "code": "b"}],
                                                     "pending-fetch")
    ingester.schema_refresh.sg = client
    sync(ingester)
    assert served_or_passed(service, SHOT_CODES) == [{"type": "Shot", "id": shot["id"], "code": "b"}]
    assert_equal_to_site(store, site)


def test_a_field_re_read_that_fails_is_done_again_and_the_field_served_again(
        site: FakeSite, store: Store, ingester: Ingester) -> None:
    """A schema event names Shot.code (same type): the field is un-primed, then read again for
    every Shot. SG fails that read once (or the ingester dies there): the next re-check must read
    the field again and prime it, not leave it un-primed (its reads passing) for good."""
    proj = make_project(site)
    site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    site.change_field_type("Shot", "code", "text")  # DisplayColumn Changes naming "code"
    ingester.poll_once()
    client = ingester.schema_refresh.sg
    assert client is not None
    failed: list[int] = []

    def failing_once(entity_type: str, filters: Any, fields: list[str] | None = None, **kw: Any) -> Any:
        if entity_type == "Shot" and fields == ["id", "code"] and not failed:
            failed.append(1)
            raise RuntimeError("SG timed out")
        return client.find(entity_type, filters, fields, **kw)

    ingester.schema_refresh.sg = type("Client", (), {"find": staticmethod(failing_once),
                                                     "schema_read": staticmethod(client.schema_read)})()
    with pytest.raises(RuntimeError):
        ingester.process_schema()
    ingester.process_schema()  # the run loop's next round
    assert failed
    with store.engine.connect() as conn:
        assert "code" in store.primed_fields(conn)["Shot"]
    assert state(store, "schema_pending") is None
    assert_equal_to_site(store, site)


def test_a_field_a_proxy_saw_sg_change_is_read_again_and_served_again(
        site: FakeSite, store: Store, ingester: Ingester, service: Any) -> None:
    """A client changes Shot.sg_cut_in's definition through the proxy (schema_field_update, no
    event): the proxy un-primes the field and names it for the ingester's schema re-read, which
    finds it still a number and must read it again and prime it (it stayed un-primed for good)."""
    proj = make_project(site)
    site.create_direct("Shot", {"code": "s1", "project": proj, "sg_cut_in": 5})
    sync(ingester)
    service.field_changed("Shot", "sg_cut_in")
    sync(ingester)
    time.sleep(1.1)  # the proxy's marker clears at a poll a second after it (pending.MARGIN)
    sync(ingester)
    ingester.poll_once()
    read = {"type": "Shot", "return_fields": ["sg_cut_in"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    assert served_or_passed(service, read) == [{"type": "Shot", "id": 1, "sg_cut_in": 5}]
