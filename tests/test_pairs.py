"""Unit tests of the pair registry, pending-write markers, the read engine's pending check, and the
proxy's write effects against the fake SG as oracle (no proxy process, no HTTP)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from cache.errors import Passthrough
from cache.ingest import IngestConfig, Ingester
from cache.proxy.service import CacheService
from cache.read import Reader, ReplicaState
from cache.replica import fetchqueue, pending
from cache.replica.pairs import (
    DEFAULT_PAIRS_FILE,
    PairRegistry,
    PairsError,
    learn_from_events,
    load_pairs_file,
)
from cache.replica.store import Store

from .fakesg import FakeSite
from .fakesg.site import PAIRS
from .paths import BASIC_SCHEMA
from .replica import SiteClient, cached_schema, prime, sync

# -- the registry ----------------------------------------------------------------------


def test_shipped_pairs_are_the_fakes() -> None:
    assert sorted(load_pairs_file()) == sorted(PAIRS)


@pytest.mark.parametrize("text", ["pairs: []", "sgcache_pairs: 1\npairs: [[Task.entity]]",
                                  "sgcache_pairs: 1\npairs: [[Task, Shot.tasks]]", "sgcache_pairs: 1\npairs: x",
                                  "sgcache_pairs: 1\npairs: [[Task.entity, Shot.tasks.x]]", ": ["])
def test_bad_pairs_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "pairs.yml"
    path.write_text(text)
    with pytest.raises(PairsError):
        load_pairs_file(path)


def test_missing_pairs_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PairsError):
        load_pairs_file(tmp_path / "nope.yml")


def test_reverse_fields_known_and_candidates() -> None:
    schema = cached_schema(FakeSite.basic())
    reg = PairRegistry.build(load_pairs_file(DEFAULT_PAIRS_FILE))
    assert reg.reverse("Task", "entity", "Shot") == "tasks"
    assert reg.reverse("Shot", "tasks", "Task") == "entity"
    assert reg.reverse("Asset", "parents", "Asset") == "assets"
    assert reg.reverse_fields(schema, "Task", "entity", ["Shot", "Asset"]) == {("Shot", "tasks"), ("Asset", "tasks")}
    # Playlist.versions has no known pair: every cached Version field that can link a Playlist
    assert reg.reverse_fields(schema, "Playlist", "versions", ["Version"]) == {("Version", "playlists")}
    # Version.entity: Shot has no cached field linking Versions
    assert reg.reverse_fields(schema, "Version", "entity", ["Shot"]) == set()
    # a field known to be paired with another field is no candidate
    reg.add(("Version", "playlists"), ("Playlist", "other"))
    assert reg.reverse_fields(schema, "Playlist", "versions", ["Version"]) == set()


# -- markers -------------------------------------------------------------------------------


@pytest.fixture
def store(db_url: str, site: FakeSite) -> Iterator[Store]:
    st = Store.open(db_url, cached_schema(site))
    yield st
    st.dispose()


def markers(store: Store) -> frozenset[tuple[str, str]]:
    with store.engine.connect() as conn:
        return pending.active(conn, store.pending)


def test_markers_clear_only_after_a_later_complete_poll(store: Store) -> None:
    with store.engine.begin() as conn:
        before = pending.poll_started(store, conn)
        pending.mark(conn, store.pending, [("Shot", "tasks"), ("Task", "*"), ("Shot", "tasks")])
        at = pending.db_clock(conn)
    assert markers(store) == {("Shot", "tasks"), ("Task", "*")}
    with store.engine.begin() as conn:
        assert pending.clear(conn, store.pending, before) == 0  # a poll that started before the write
        assert pending.clear(conn, store.pending, at + pending.MARGIN / 2) == 0  # too close: not safe
    assert len(markers(store)) == 2
    with store.engine.connect() as conn:
        pending.poll_done(store, conn, at + 2 * pending.MARGIN, [], full=True)  # more events to read
    assert len(markers(store)) == 2
    with store.engine.begin() as conn:
        store.queue_fetch(conn, [("Task", 9)], "new")
    with store.engine.connect() as conn:
        pending.poll_done(store, conn, at + 2 * pending.MARGIN, [], full=False)  # a fetch still queued
    assert len(markers(store)) == 2
    with store.engine.begin() as conn:
        store.unqueue_fetch(conn, [("Task", 9)])
        store.queue_fetch(conn, [("Task", 10)], "new")  # queued by a later poll
    with store.engine.connect() as conn:
        pending.poll_done(store, conn, at + 2 * pending.MARGIN, [], full=False)
    assert len(markers(store)) == 2
    with store.engine.begin() as conn:
        store.unqueue_fetch(conn, [("Task", 10)])  # the fetches ran between two polls
        pending.poll_started(store, conn)  # the next poll: the earlier complete poll's markers clear
    assert markers(store) == frozenset()
    with store.engine.begin() as conn:
        pending.mark(conn, store.pending, [("Shot", "code")])
        later = pending.db_clock(conn) + 2 * pending.MARGIN
    with store.engine.connect() as conn:
        pending.poll_done(store, conn, later, [], full=False)  # queue empty: at once
    assert markers(store) == frozenset()


def test_a_newer_write_keeps_the_marker(store: Store) -> None:
    with store.engine.begin() as conn:
        pending.mark(conn, store.pending, [("Shot", "tasks")])
        first = pending.db_clock(conn)
    with store.engine.begin() as conn:
        conn.execute(store.pending.update().values(at=first + 10))  # as if written 10 s later
        pending.mark(conn, store.pending, [("Shot", "tasks")])  # an older time never lowers it
    with store.engine.begin() as conn:
        assert pending.clear(conn, store.pending, first + 5) == 0
        assert pending.clear(conn, store.pending, first + 12) == 1


def test_clock_moves_and_has_sub_second_resolution(store: Store) -> None:
    with store.engine.connect() as conn:
        a = pending.db_clock(conn)
        b = pending.db_clock(conn)
    assert b >= a and (a != int(a) or b != int(b))


# -- the read engine's check -------------------------------------------------------------------


def plan_touched(store: Store, params: dict[str, Any]) -> frozenset[tuple[str, str]]:
    with store.engine.begin() as conn:
        for t in store.schema.entities:
            store.mark_primed(conn, t)
        replica_state = ReplicaState(store.primed_fields(conn))
    return Reader(store).plan(params, replica_state).touched


def test_plan_touches_every_field_it_names(store: Store) -> None:
    touched = plan_touched(store, {
        "type": "Task", "return_fields": ["content", "entity.Shot.sg_sequence.Sequence.code"],
        "filters": {"logical_operator": "and", "conditions": [
            {"path": "step.Step.code", "relation": "is", "values": ["anim"]},
            {"logical_operator": "or", "conditions": [{"path": "sg_status_list", "relation": "is", "values": ["ip"]}]},
        ]},
        "sorts": [{"field_name": "due_date", "direction": "asc"}],
        "include_archived_projects": False, "return_only": "active",
        "paging": {"entities_per_page": 10, "current_page": 1}})
    assert touched >= {("Task", "*"), ("Task", "content"), ("Task", "entity"), ("Shot", "*"), ("Shot", "sg_sequence"),
                       ("Sequence", "*"), ("Sequence", "code"), ("Task", "step"), ("Step", "*"), ("Step", "code"),
                       ("Task", "sg_status_list"), ("Task", "due_date"), ("Task", "project"), ("Project", "*"),
                       ("Project", "archived")}
    assert ("Shot", "tasks") not in touched


def test_read_passes_on_a_pending_field_or_type(store: Store) -> None:
    with store.engine.begin() as conn:
        for t in store.schema.entities:
            store.mark_primed(conn, t)
    reader = Reader(store)
    params = {"type": "Shot", "return_fields": ["code", "tasks"], "return_only": "active",
              "filters": {"logical_operator": "and", "conditions": []}, "paging": {"entities_per_page": 10, "current_page": 1}}
    deep = {**params, "filters": {"logical_operator": "and", "conditions": [
        {"path": "tasks.Task.content", "relation": "is", "values": ["x"]}]}}

    def read(p: dict[str, Any], *standing: tuple[str, str]) -> Any:
        with store.engine.begin() as conn:
            conn.execute(store.pending.delete())
            pending.mark(conn, store.pending, standing)
        with store.engine.connect() as conn:
            return reader.read(conn, p, ReplicaState(store.primed_fields(conn)), check_pending=True)["entities"]

    assert read(params, ("Task", "entity"), ("Version", "*")) == []
    assert read(deep, ("Task", "entity")) == []
    with pytest.raises(Passthrough) as exc:
        read(params, ("Shot", "tasks"))
    assert exc.value.reason == "pending-write"
    with pytest.raises(Passthrough):
        read(params, ("Shot", "*"))
    with pytest.raises(Passthrough):
        read(deep, ("Task", "*"))
    with pytest.raises(Passthrough):
        read(deep, ("Task", "content"))


# -- learning pairs from backref events ------------------------------------------------------------


def test_pairs_are_learned_from_backref_events(site: FakeSite, store: Store) -> None:
    site.add_pair(("Version", "playlists"), ("Playlist", "versions"))
    p = site.create_direct("Project", {"name": "P"})
    v = site.create_direct("Version", {"code": "v1", "project": p})
    start = site.last_event_id()
    site.create_direct("Playlist", {"code": "pl", "project": p, "versions": [{"type": "Version", "id": v["id"]}]})
    with store.engine.begin() as conn:
        assert learn_from_events(conn, store.pairs_table, site.events(start)) == 2
        assert learn_from_events(conn, store.pairs_table, site.events(start)) == 0
        reg = PairRegistry().with_learned(conn, store.pairs_table)
    assert reg.reverse("Playlist", "versions", "Version") == "playlists"
    assert reg.reverse("Version", "playlists", "Playlist") == "versions"


def test_the_ingester_learns_pairs_and_clears_markers(site: FakeSite, store: Store) -> None:
    site.add_pair(("Version", "playlists"), ("Playlist", "versions"))
    client = SiteClient(site)
    prime(store, client)
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01))
    try:
        with store.engine.begin() as conn:
            pending.mark(conn, store.pending, [("Version", "playlists")])
            conn.execute(store.pending.update().values(at=pending.db_clock(conn) - 2 * pending.MARGIN))
        p = site.create_direct("Project", {"name": "P"})
        v = site.create_direct("Version", {"code": "v1", "project": p})
        site.create_direct("Playlist", {"code": "pl", "project": p, "versions": [{"type": "Version", "id": v["id"]}]})
        ing.poll_once()
        with store.engine.connect() as conn:
            assert PairRegistry().with_learned(conn, store.pairs_table).reverse("Playlist", "versions", "Version")
        assert markers(store) == {("Version", "playlists")}  # the poll queued fetches (the New rows)
        ing.process_fetch_queue()
        ing.poll_once()
        assert markers(store) == frozenset()
    finally:
        ing.close()


# -- the proxy's write effects, with the fake SG as the oracle ------------------------------------------


@pytest.fixture
def service(tmp_path: Path, db_url: str, site: FakeSite) -> Iterator[CacheService]:
    schema_path = tmp_path / "schema.yml"
    schema_path.write_text(cached_schema(site).to_yaml())
    # learning waits for the database as long as it takes (write_wait=0): on a loaded machine a 2 s
    # wait ran out, the learn fell back to markers (right, but these tests check what it stored)
    svc = CacheService(db_url, schema_path, max_lag=0, write_wait=0)
    yield svc
    svc.close()


def learn(site: FakeSite, service: CacheService, method: str, params: dict[str, Any]) -> Any:
    """Send a write to the fake as the proxy would, learn its answer, complete partial rows from the fake."""
    result = site._direct(method, params, True)
    to_fetch = service.learn(method, params, result)
    recorded(service)
    store = service.store
    for entity_type, entity_id in to_fetch:
        fields = [f for f in store.cached_field_names(entity_type) if f in site.schema[entity_type]]
        rows = site.find_direct(entity_type, [["id", "is", entity_id]], fields)
        with store.write_engine.begin() as conn:
            store.write_entities(conn, entity_type, rows, "proxy", complete=True)
            store.unqueue_fetch(conn, [(entity_type, entity_id)])
    return result


def recorded(service: CacheService) -> None:
    """Wait for a learn the proxy gave up waiting on (a loaded machine's slow commit: it goes on
    in the background) to be recorded, answer stored or effects marked, as a read would."""
    from .wait import wait_until

    def done() -> bool:
        if not service.learner.all_recorded():
            try:
                service.learner.record_unrecorded()
            except Passthrough:
                return False
        return service.learner.all_recorded()

    wait_until(done, 30, "the learn deferred under load to be recorded")


def learn_racing(site: FakeSite, service: CacheService, params: dict[str, Any], ingester_moved: bool) -> None:
    """Send an update to the fake and learn SG's answer; ``ingester_moved``: the ingester applied
    events while it was on its way (the answer is then not stored, only marked)."""
    result = site._direct("update", params, True)
    mark = service.write_mark()
    assert mark is not None
    if ingester_moved:
        with service.store.write_engine.begin() as conn:
            service.store.set_state(conn, "event_high", mark.event_high + 5)
    service.learn("update", params, result, mark)


def assert_replica_is_sg_except_markers(site: FakeSite, service: CacheService) -> None:
    """Every (type, field) with no pending-write marker reads in the replica as in SG."""
    store = service.store
    with store.engine.connect() as conn:
        primed = store.primed_fields(conn)
        standing = pending.active(conn, store.pending)
        reader = Reader(store)
        replica_state = ReplicaState(primed)
        for entity_type in store.schema.entities:
            if (entity_type, "*") in standing:
                continue
            fields = sorted(f for f in primed.get(entity_type, ()) if f != "id" and (entity_type, f) not in standing)
            params = {"type": entity_type, "return_fields": fields,
                      "sorts": [{"field_name": "id", "direction": "asc"}],
                      "return_only": "active",
              "filters": {"logical_operator": "and", "conditions": []}, "paging": {"entities_per_page": 500, "current_page": 1}}
            ours = reader.read(conn, params, replica_state)["entities"]
            theirs = site.find_direct(entity_type, [], fields, [{"field_name": "id", "direction": "asc"}])
            assert ours == theirs, f"{entity_type} differs"


def wire(entity_type: str, entity_id: int | None, fields: dict[str, Any], mode: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"type": entity_type, "fields": [
        {"field_name": k, "value": v, **({"multi_entity_update_mode": mode} if mode and isinstance(v, list) else {})}
        for k, v in fields.items()]}
    if entity_id is not None:
        params["id"] = entity_id
    else:
        params["return_fields"] = ["id"]
    return params


def test_random_pair_writes_leave_the_replica_right_or_marked(site: FakeSite, service: CacheService) -> None:
    p = site.create_direct("Project", {"name": "P"})
    proj = {"type": "Project", "id": p["id"]}
    seqs = [site.create_direct("Sequence", {"code": f"SQ{i}", "project": proj}) for i in range(3)]
    shots = [site.create_direct("Shot", {"code": f"sh{i}", "project": proj}) for i in range(6)]
    assets = [site.create_direct("Asset", {"code": f"a{i}", "project": proj}) for i in range(4)]
    versions = [site.create_direct("Version", {"code": f"v{i}", "project": proj}) for i in range(2)]
    tasks = [site.create_direct("Task", {"content": f"t{i}", "project": proj}) for i in range(4)]
    prime(service.store, SiteClient(site))

    def link(t: str, row: dict[str, Any]) -> dict[str, Any]:
        return {"type": t, "id": row["id"]}

    rnd = random.Random(7)
    writes = [
        lambda: ("update", wire("Task", rnd.choice(tasks)["id"], {"entity": link("Shot", rnd.choice(shots))})),
        lambda: ("update", wire("Task", rnd.choice(tasks)["id"], {"entity": link("Asset", rnd.choice(assets))})),
        lambda: ("update", wire("Task", rnd.choice(tasks)["id"], {"entity": None})),
        lambda: ("update", wire("Shot", rnd.choice(shots)["id"], {"tasks": [link("Task", rnd.choice(tasks))]},
                                rnd.choice(["add", "remove", "set"]))),
        lambda: ("update", wire("Shot", rnd.choice(shots)["id"], {"sg_sequence": link("Sequence", rnd.choice(seqs))})),
        lambda: ("update", wire("Sequence", rnd.choice(seqs)["id"],
                                {"shots": [link("Shot", s) for s in rnd.sample(shots, 2)]},
                                rnd.choice(["add", "remove", "set"]))),
        lambda: ("update", wire("Shot", rnd.choice(shots)["id"],
                                {"assets": [link("Asset", a) for a in rnd.sample(assets, 2)]},
                                rnd.choice(["add", "remove", "set"]))),
        lambda: ("update", wire("Asset", rnd.choice(assets)["id"],
                                {"parents": [link("Asset", rnd.choice(assets))]}, rnd.choice(["add", "set"]))),
        lambda: ("create", wire("Task", None, {"content": "new", "entity": link("Shot", rnd.choice(shots))})),
        lambda: ("create", wire("Note", None, {"subject": "n", "project": proj,
                                               "note_links": [link("Shot", rnd.choice(shots)),
                                                              link("Version", rnd.choice(versions))],
                                               "tasks": [link("Task", rnd.choice(tasks))]})),
    ]
    for _ in range(60):
        method, params = rnd.choice(writes)()
        learn(site, service, method, params)
        assert_replica_is_sg_except_markers(site, service)
    # the modelled pairs left no marker on the pairs' fields
    with service.store.engine.connect() as conn:
        standing = pending.active(conn, service.store.pending)
    assert {f for _t, f in standing} <= {"updated_at", "updated_by"}


def test_unmodelled_effects_are_marked(site: FakeSite, service: CacheService) -> None:
    p = site.create_direct("Project", {"name": "P"})
    proj = {"type": "Project", "id": p["id"]}
    shot = site.create_direct("Shot", {"code": "sh", "project": proj})
    v = site.create_direct("Version", {"code": "v", "project": proj})
    pl = site.create_direct("Playlist", {"code": "pl", "project": proj})
    site.add_task_template(3, "T", [{"content": "Layout"}])
    prime(service.store, SiteClient(site))
    site.add_pair(("Version", "playlists"), ("Playlist", "versions"))
    learn(site, service, "update", wire("Playlist", pl["id"], {"versions": [{"type": "Version", "id": v["id"]}]}))
    assert ("Version", "playlists") in markers(service.store)
    learn(site, service, "create", wire("Shot", None, {"code": "t", "project": proj,
                                                       "task_template": {"type": "TaskTemplate", "id": 3}}))
    assert {("Task", "*"), ("Shot", "tasks")} <= markers(service.store)
    learn(site, service, "delete", {"type": "Shot", "id": shot["id"]})
    assert {("Task", "*"), ("Task", "entity"), ("Version", "entity")} <= markers(service.store)
    assert_replica_is_sg_except_markers(site, service)


def test_markers_need_no_proxy_state(site: FakeSite, service: CacheService, db_url: str, tmp_path: Path) -> None:
    """A second service on the same database passes at once what the first one marked."""
    p = site.create_direct("Project", {"name": "P"})
    site.create_direct("Shot", {"code": "sh", "project": {"type": "Project", "id": p["id"]}})
    prime(service.store, SiteClient(site))
    other = CacheService(db_url, tmp_path / "schema.yml", max_lag=0)
    try:
        params = {"type": "Shot", "return_fields": ["code", "updated_at"],
                  "return_only": "active",
              "filters": {"logical_operator": "and", "conditions": []}, "paging": {"entities_per_page": 10, "current_page": 1}}
        assert other.read(params)["entities"]
        with service.store.write_engine.begin() as conn:
            pending.mark(conn, service.store.pending, [("Shot", "updated_at")])
        with pytest.raises(Passthrough) as exc:
            other.read(params)
        assert exc.value.reason == "pending-write"
        assert other.read({**params, "return_fields": ["code"]})["entities"]
    finally:
        other.close()


def test_pending_table_is_in_the_store(store: Store) -> None:
    names = set(sa.inspect(store.engine).get_table_names())
    assert {"sgcache_pending", "sgcache_pairs"} <= names


def test_failed_fetch_after_a_partial_answer_marks_the_type(service: CacheService) -> None:
    """Other proxies see the fetch queue up to a second late: the marker reaches their next read."""
    with service.store.write_engine.begin() as conn:
        service.store.queue_fetch(conn, [("Task", 99)], "partial create answer")
    service.fetch_rows("http://127.0.0.1:9/api3/json", {"script_name": "x", "script_key": "y"}, [("Task", 99)], None)
    assert ("Task", "*") in markers(service.store)


def test_unknown_old_value_marks_both_sides(site: FakeSite, service: CacheService) -> None:
    """A row the replica does not hold: what it linked before is unknown, so nothing is applied on the
    other side and both the other side and the written field wait."""
    p = site.create_direct("Project", {"name": "P"})
    proj = {"type": "Project", "id": p["id"]}
    shots = [site.create_direct("Shot", {"code": f"sh{i}", "project": proj}) for i in range(2)]
    prime(service.store, SiteClient(site))
    task = site.create_direct("Task", {"content": "t", "project": proj, "entity": {"type": "Shot", "id": shots[0]["id"]}})
    learn(site, service, "update", wire("Task", task["id"], {"entity": {"type": "Shot", "id": shots[1]["id"]}}))
    assert {("Shot", "tasks"), ("Asset", "tasks"), ("Sequence", "tasks"), ("Task", "entity")} <= markers(service.store)
    assert_replica_is_sg_except_markers(site, service)


def test_an_answer_that_arrives_after_the_ingester_moved_is_only_marked(site: FakeSite, service: CacheService) -> None:
    """SG's answer may be older than what the replica holds once the ingester applied events while
    the write was on its way (a concurrent write SG applied after it): it is not stored, and what
    the write could have changed passes until the ingester has the write's own events."""
    p = site.create_direct("Project", {"name": "P"})
    proj = {"type": "Project", "id": p["id"]}
    shot = site.create_direct("Shot", {"code": "sh", "project": proj, "description": "d"})
    site.create_direct("Task", {"content": "t", "project": proj, "entity": {"type": "Shot", "id": shot["id"]}})
    prime(service.store, SiteClient(site))
    mark = service.write_mark()
    assert mark is not None
    params = wire("Shot", shot["id"], {"code": "answered"})
    result = site._direct("update", params, True)
    with service.store.write_engine.begin() as conn:
        service.store.set_state(conn, "event_high", mark.event_high + 5)  # the ingester applied events meanwhile
    assert service.learn("update", params, result, mark) == []
    with service.store.engine.connect() as conn:
        code = conn.execute(sa.select(service.store.tables["Shot"].c.code)).scalar_one()
        markers = {(r.entity_type, r.field_name) for r in conn.execute(sa.select(service.store.pending))}
    assert code == "sh"  # not stored
    # an update changes only what it sent (and what SG sets): the rest of the type is still served;
    # the new name shows in every link to the Shot, so those links pass too
    assert {("Shot", "code"), ("Shot", "updated_at"), ("Task", "entity")} <= markers
    assert ("Shot", pending.WHOLE_TYPE) not in markers
    assert_replica_is_sg_except_markers(site, service)
    shots = {"type": "Shot", "return_fields": ["description"], "return_only": "active",
             "filters": {"logical_operator": "and", "conditions": []},
             "paging": {"entities_per_page": 10, "current_page": 1}}
    assert service.read(shots)["entities"] == [{"type": "Shot", "id": shot["id"], "description": "d"}]
    with pytest.raises(Passthrough) as passed:
        service.read({**shots, "type": "Task", "return_fields": ["entity"]})
    assert passed.value.reason == "pending-write"
    with service.store.write_engine.begin() as conn:
        conn.execute(service.store.pending.delete())
    assert service.learn("update", params, result, mark._replace(event_high=mark.event_high + 5)) == []  # the ingester did not move: stored
    with service.store.engine.connect() as conn:
        assert conn.execute(sa.select(service.store.tables["Shot"].c.code)).scalar_one() == "answered"


def test_a_rename_of_an_uncached_type_shows_in_the_links_to_it(site: FakeSite, service: CacheService) -> None:
    """TaskTemplate is not cached, but Shot.task_template shows its name (from the registry): the
    learnt rename goes there, as the ingester's events would bring it."""
    assert "TaskTemplate" not in service.store.tables
    p = site.create_direct("Project", {"name": "P"})
    template = site.add_task_template(7, "tpl", [])
    shot = site.create_direct("Shot", {"code": "sh", "project": {"type": "Project", "id": p["id"]}})
    site._direct("update", wire("Shot", shot["id"], {"task_template": template}), True)
    prime(service.store, SiteClient(site))
    read = {"type": "Shot", "return_fields": ["task_template"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    assert service.read(read)["entities"][0]["task_template"]["name"] == "tpl"
    learn(site, service, "update", wire("TaskTemplate", 7, {"code": "renamed"}))
    assert service.read(read)["entities"][0]["task_template"]["name"] == "renamed"
    assert_replica_is_sg_except_markers(site, service)


def test_a_rename_of_a_row_the_replica_does_not_hold_shows_in_the_links_to_it(db_url: str) -> None:
    """The renamed Shot is not in the replica (its row waits for a fetch), a Task linking it is:
    the Task's link shows the new name, not the one the registry had."""
    svc = CacheService(db_url, BASIC_SCHEMA, max_lag=0)
    try:
        store = svc.store
        blank = dict.fromkeys(store.schema.entities["Task"].fields)
        with store.write_engine.begin() as conn:
            store.write_entities(conn, "Task", [{**blank, "id": 1, "content": "t",
                                                 "entity": {"type": "Shot", "id": 7, "name": "old"}}],
                                 "scan", complete=True)
            store.mark_primed(conn, "Task")
            store.mark_primed(conn, "Shot")
        params = wire("Shot", 7, {"code": "new"})
        assert svc.learn("update", params, {"type": "Shot", "id": 7, "code": "new"}) == [("Shot", 7)]
        read = {"type": "Task", "return_fields": ["entity"], "return_only": "active",
                "filters": {"logical_operator": "and", "conditions": []},
                "paging": {"entities_per_page": 10, "current_page": 1}}
        assert svc.read(read)["entities"][0]["entity"] == {"type": "Shot", "id": 7, "name": "new"}
    finally:
        svc.close()


@pytest.mark.parametrize("ingester_moved", [False, True])
def test_a_tasks_schedule_fields_pass_after_a_write_sg_reschedules_from(
        site: FakeSite, service: CacheService, ingester_moved: bool) -> None:
    """SG recomputes a Task's due date or duration when a write sets its start date (and moves the
    Tasks downstream of it), and answers with the fields sent only: reads of the schedule fields
    pass until the ingester has the write; the Task's other fields are still served; a write of
    other fields reschedules nothing."""
    p = site.create_direct("Project", {"name": "P"})
    task = site.create_direct("Task", {"content": "t", "project": {"type": "Project", "id": p["id"]},
                                       "start_date": "2026-01-05", "due_date": "2026-01-09"})
    prime(service.store, SiteClient(site))
    tasks = {"type": "Task", "return_fields": ["content"], "return_only": "active",
             "filters": {"logical_operator": "and", "conditions": []},
             "paging": {"entities_per_page": 10, "current_page": 1}}
    due = {**tasks, "return_fields": ["due_date"]}

    def write(fields: dict[str, Any]) -> None:
        learn_racing(site, service, wire("Task", task["id"], fields), ingester_moved)

    write({"content": "renamed"})
    assert not {("Task", "due_date"), ("Task", "duration")} & markers(service.store)
    assert service.read(due)["entities"][0]["due_date"] == "2026-01-09"
    write({"start_date": "2026-01-12"})
    assert site.find_direct("Task", [["id", "is", task["id"]]], ["due_date"])[0]["due_date"] == "2026-01-16"
    assert {("Task", "start_date"), ("Task", "due_date"), ("Task", "duration")} <= markers(service.store)
    assert_replica_is_sg_except_markers(site, service)
    with pytest.raises(Passthrough) as passed:
        service.read(due)
    assert passed.value.reason == "pending-write"
    assert service.read({**tasks, "return_fields": ["sg_status_list"]})["entities"]  # served
    if not ingester_moved:  # stored (else marked pending, as it was sent)
        assert service.read(tasks)["entities"][0]["content"] == "renamed"


@pytest.mark.parametrize("ingester_moved", [False, True])
def test_a_persons_new_first_name_is_not_served_under_their_old_name(
        site: FakeSite, service: CacheService, ingester_moved: bool) -> None:
    """SG composes a person's name from the first and last names: an update of one changes the
    name their links show (a Task's assignees), which SG's answer does not carry. Those reads pass
    until the ingester has the write; the person's other fields are still served."""
    p = site.create_direct("Project", {"name": "P"})
    person = site.create_direct("HumanUser", {"login": "ann", "firstname": "Ann", "lastname": "Lee",
                                              "email": "ann@example.com"})
    assignee = {"type": "HumanUser", "id": person["id"]}
    site.create_direct("Task", {"content": "t", "project": {"type": "Project", "id": p["id"]},
                                "task_assignees": [assignee]})
    prime(service.store, SiteClient(site))
    assignees = {"type": "Task", "return_fields": ["task_assignees"], "return_only": "active",
                 "filters": {"logical_operator": "and", "conditions": []},
                 "paging": {"entities_per_page": 10, "current_page": 1}}
    assert service.read(assignees)["entities"][0]["task_assignees"][0]["name"] == "Ann Lee"
    learn_racing(site, service, wire("HumanUser", person["id"], {"firstname": "Anna"}), ingester_moved)
    sg = site.find_direct("Task", [], ["task_assignees"])[0]["task_assignees"][0]["name"]
    assert sg == "Anna Lee"  # (the fake composes it as SG does)
    with pytest.raises(Passthrough) as passed:
        service.read(assignees)
    assert passed.value.reason == "pending-write"
    people = {**assignees, "type": "HumanUser", "return_fields": ["name"]}
    with pytest.raises(Passthrough):
        service.read(people)
    assert service.read({**people, "return_fields": ["email"]})["entities"][0]["email"] == "ann@example.com"
    assert_replica_is_sg_except_markers(site, service)
    ing = Ingester(service.store, SiteClient(site), IngestConfig(batch=50, poll_interval=0.01))
    try:  # the ingester brings the new name (the event's entity link carries it), then the marks go
        sync(ing)
        with service.store.write_engine.begin() as conn:
            conn.execute(service.store.pending.update().values(at=pending.db_clock(conn) - 2 * pending.MARGIN))
        sync(ing)
    finally:
        ing.close()
    assert markers(service.store) == frozenset()
    assert service.read(assignees)["entities"][0]["task_assignees"][0]["name"] == "Anna Lee"


def test_the_ingester_reads_a_person_again_when_a_part_of_their_name_changes(
        site: FakeSite, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether SG logs the change of the name it composes from the first and last names is not
    known: an event changing one has the ingester read the row again, so the replica's ``name``
    is SG's even when no event names it."""
    person = site.create_direct("HumanUser", {"login": "ann", "firstname": "Ann", "lastname": "Lee"})
    client = SiteClient(site)
    prime(store, client)

    def composed_unlogged(caller: Any, row: dict[str, Any], in_create: bool = False) -> None:
        row["name"] = f"{row['firstname']} {row['lastname']}"

    monkeypatch.setattr(site, "_compose_name", composed_unlogged)  # recomputed, no event for it
    site._direct("update", wire("HumanUser", person["id"], {"firstname": "Anna"}), True)
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01))
    try:
        sync(ing)
    finally:
        ing.close()
    with store.engine.connect() as conn:
        table = store.tables["HumanUser"]
        row = conn.execute(sa.select(table.c.firstname, table.c.name).where(table.c.id == person["id"])).one()
    assert tuple(row) == ("Anna", "Anna Lee")


def test_a_task_created_with_dependencies_marks_the_schedule_and_one_without_does_not(
        site: FakeSite, service: CacheService) -> None:
    """A created row is read back whole; only its dependencies move other Tasks."""
    p = site.create_direct("Project", {"name": "P"})
    proj = {"type": "Project", "id": p["id"]}
    prime(service.store, SiteClient(site))
    first = learn(site, service, "create", wire("Task", None, {"content": "a", "project": proj,
                                                               "start_date": "2026-01-05"}))
    assert not {("Task", "due_date"), ("Task", "start_date")} & markers(service.store)
    upstream = [{"type": "Task", "id": first["id"], "name": "a"}]  # (the fake has no dependencies)
    params = wire("Task", None, {"content": "b", "project": proj, "upstream_tasks": upstream})
    service.learn("create", params, {"type": "Task", "id": first["id"] + 1, "content": "b", "project": proj,
                                     "upstream_tasks": upstream})
    assert {("Task", "due_date"), ("Task", "start_date")} <= markers(service.store)


@pytest.mark.parametrize(("method", "entity_type", "fields", "marked", "not_marked"), [
    ("update", "Task", {"est_in_mins": 600}, {("Task", "time_percent_of_est"), ("Task", "due_date"),
                                              ("Project", "end_date")}, set()),
    ("update", "Task", {"content": "x"}, set(), {("Task", "time_percent_of_est"), ("Project", "end_date")}),
    ("create", "Task", {"content": "x", "start_date": "2026-01-05"}, {("Project", "start_date")},
     {("Task", "due_date")}),
    ("create", "Task", {"content": "x"}, set(), {("Project", "start_date"), ("Task", "due_date")}),
    ("delete", "Task", {}, {("Project", "start_date"), ("Task", "due_date")}, set()),
    ("create", "TimeLog", {"duration": 60}, {("Task", "time_percent_of_est")}, {("Task", "due_date")}),
    ("update", "PublishedFile", {"path": {"local_path": "/mnt/p/a.exr"}},
     {("PublishedFile", "path_cache"), ("PublishedFile", "path_cache_storage")}, set()),
    ("update", "PublishedFile", {"code": "a"}, set(), {("PublishedFile", "path_cache_storage")}),
    ("update", "HumanUser", {"firstname": "Ann"}, {("HumanUser", "name"), ("HumanUser", "lastname"),
                                                   ("Task", "task_assignees"), ("Shot", "created_by")}, set()),
    ("update", "HumanUser", {"email": "a@b"}, set(), {("HumanUser", "name"), ("Task", "task_assignees")}),
    ("create", "HumanUser", {"firstname": "Ann"}, set(), {("HumanUser", "name"), ("Task", "task_assignees")}),
])
def test_what_sg_computes_itself_is_marked(tmp_path: Path, db_url: str, method: str, entity_type: str,
                                           fields: dict[str, Any], marked: set[tuple[str, str]],
                                           not_marked: set[tuple[str, str]]) -> None:
    """The fields SG's schema says are not editable (a project's dates span its Tasks', a Task's
    percent of its bid is the time logged over it) change with the writes they are computed from,
    whose answers do not carry them. (The shipped subset leaves them out; a site's may keep them.)"""
    data = yaml.safe_load(BASIC_SCHEMA.read_text())
    data["entities"]["Project"]["fields"].update(start_date="date", end_date="date")
    data["entities"]["Task"]["fields"]["time_percent_of_est"] = "percent"
    schema_path = tmp_path / "schema.yml"
    schema_path.write_text(yaml.safe_dump(data))
    svc = CacheService(db_url, schema_path, max_lag=0)
    try:
        assert svc.store.schema.field("Task", "time_percent_of_est") is not None
        if method == "delete":
            svc.learn("delete", {"type": entity_type, "id": 5}, True)
        else:
            params = wire(entity_type, 5 if method == "update" else None, fields)
            svc.learn(method, params, {"type": entity_type, "id": 5, **fields})
        standing = markers(svc.store)
        assert marked <= standing
        assert not not_marked & standing
    finally:
        svc.close()


@pytest.mark.parametrize("stored", [True, False])
def test_the_other_side_of_a_pair_not_known_is_marked_with_what_sg_sets_there(db_url: str, stored: bool) -> None:
    """Playlist.versions and Version.playlists are not a known pair (schema/pairs.yml): a write of
    one marks the other, and the ``updated_at``/``updated_by`` of its type, as a known pair's other
    side is (SG sets them on each row it changes)."""
    svc = CacheService(db_url, BASIC_SCHEMA, max_lag=0)
    try:
        assert svc.learner.pairs.reverse("Playlist", "versions", "Version") is None
        params = wire("Playlist", 5, {"versions": [{"type": "Version", "id": 9}]})
        mark = svc.write_mark()
        assert mark is not None
        if not stored:  # the ingester moved while the write was on its way: its answer is only marked
            with svc.store.write_engine.begin() as conn:
                svc.store.set_state(conn, "event_high", mark.event_high + 5)
        svc.learn("update", params, {"type": "Playlist", "id": 5, "versions": [{"type": "Version", "id": 9}]}, mark)
        assert {("Version", "playlists"), ("Version", "updated_at"), ("Version", "updated_by")} <= markers(svc.store)
        assert not {("Shot", "updated_at"), ("Task", "updated_at")} & markers(svc.store)
    finally:
        svc.close()


def test_a_write_the_database_did_not_take_passes_until_its_effects_are_marked(
        site: FakeSite, service: CacheService, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SG took the write but the replica did not (the breaker was open, or the database failed):
    once the database answers again, the reads the write could change pass, through this proxy and
    through any other, instead of serving the row as it was before the write."""
    p = site.create_direct("Project", {"name": "P"})
    proj = {"type": "Project", "id": p["id"]}
    shots = [site.create_direct("Shot", {"code": f"sh{i}", "project": proj}) for i in range(2)]
    prime(service.store, SiteClient(site))
    shot_codes = {"type": "Shot", "return_fields": ["code"], "return_only": "active",
                  "filters": {"logical_operator": "and", "conditions": []},
                  "paging": {"entities_per_page": 10, "current_page": 1}}
    projects = {**shot_codes, "type": "Project", "return_fields": ["name"]}
    assert [e["code"] for e in service.read(shot_codes)["entities"]] == ["sh0", "sh1"]

    def reason(svc: CacheService, params: dict[str, Any]) -> str:
        with pytest.raises(Passthrough) as exc:
            svc.read(params)
        return exc.value.reason

    # 1. the breaker is open while SG answers the write: learning meets db-backoff
    service.breaker.failures, service.breaker.open_until = 99, 1e18
    params = wire("Shot", shots[0]["id"], {"code": "renamed"})
    assert service.learn("update", params, site._direct("update", params, True)) == []
    service.breaker.open_until = 0.0  # the back-off is over: the next request probes the database
    assert reason(service, shot_codes) == "pending-write"
    other = CacheService(db_url, tmp_path / "schema.yml", max_lag=0)
    try:
        assert reason(other, shot_codes) == "pending-write"  # the markers are in the database
        assert other.read(projects)["entities"] == [{"type": "Project", "id": p["id"], "name": "P"}]
    finally:
        other.close()

    # 2. the database fails while learning, and still when the next read comes
    with service.store.write_engine.begin() as conn:
        conn.execute(service.store.pending.delete())
    registry = service.learner.pairs

    class Failing:
        def with_learned(self, *_args: Any) -> Any:
            raise sa.exc.OperationalError("SELECT", {}, Exception("database gone"))

    monkeypatch.setattr(service.learner, "pairs", Failing())
    params = wire("Shot", shots[1]["id"], {"code": "renamed too"})
    assert service.learn("update", params, site._direct("update", params, True)) == []
    assert reason(service, shot_codes) == "db-error"  # cannot mark: passes anyway
    monkeypatch.setattr(service.learner, "pairs", registry)
    assert reason(service, shot_codes) == "pending-write"
    assert ("Shot", "code") in markers(service.store)
    assert service.read(projects)["entities"]  # recorded once: reads of other types are served again


ASSET_CODES = {"type": "Asset", "return_fields": ["code"], "return_only": "active",
               "filters": {"logical_operator": "and", "conditions": []},
               "paging": {"entities_per_page": 500, "current_page": 1}}


def passes(svc: CacheService, params: dict[str, Any]) -> str | None:
    """The pass reason of a read, or None when it is served."""
    try:
        svc.read(params)
    except Passthrough as exc:
        return exc.reason
    return None


def assets(site: FakeSite, count: int) -> list[dict[str, Any]]:
    p = site.create_direct("Project", {"name": "P"})
    return [site.create_direct("Asset", {"code": f"a{i:03d}", "project": {"type": "Project", "id": p["id"]}})
            for i in range(count)]


def test_a_delete_with_a_parameter_sg_ignores_is_learnt(site: FakeSite, service: CacheService) -> None:
    """``{"type": "Asset", "id": 1, "fields": 5}``: SG ignores ``fields`` and retires the Asset. Reading
    the odd ``fields`` raised: the write was kept unrecorded, and marking it raised the same way
    before every read, so every read by every client passed until the proxy restarted."""
    victim = assets(site, 2)[0]
    prime(service.store, SiteClient(site))
    assert learn(site, service, "delete", {"type": "Asset", "id": victim["id"], "fields": 5}) is True
    assert service.learner.all_recorded()
    assert [e["code"] for e in service.read(ASSET_CODES)["entities"]] == ["a001"]
    assert_replica_is_sg_except_markers(site, service)


@pytest.mark.parametrize("args", [
    {"type": "Shot", "id": 1, "fields": 5},
    {"type": "Shot", "id": 1, "fields": {"code": "x"}},
    {"type": "Shot", "id": 1, "fields": [{"field_name": ["code"], "value": "x"}]},
    {"type": "Shot", "id": 1, "fields": [{"field_name": "code", "value": "x", "multi_entity_update_mode": ["add"]}]},
    {"type": "Shot", "id": 1, "fields": [{"field_name": "x" * 100, "value": 1}]},
    {"type": "Shot\x00" + "x" * 100, "id": 1, "fields": []},
    {"type": "Shot", "id": 2 ** 70, "fields": [{"field_name": "code", "value": "x"}]},
])
def test_a_write_of_any_shape_is_recorded_once(site: FakeSite, service: CacheService, args: dict[str, Any]) -> None:
    """Whatever shape a write's arguments have, what it could have changed is marked (every cached
    type when they cannot be read) and the write leaves the unrecorded list: it never keeps the
    proxy's reads passing. Markers name only cached types and fields (a client's name may not fit)."""
    assets(site, 1)
    prime(service.store, SiteClient(site))
    for method in ("update", "create", "delete"):
        service.outcome_unknown(method, args)
        service.learner.defer(method, args)
        passes(service, ASSET_CODES)
        assert service.learner.all_recorded()
        service.learn(method, args, {"type": "Shot", "id": 1, "code": "x"} if method != "delete" else True)
        passes(service, ASSET_CODES)
        assert service.learner.all_recorded()
    schema = service.store.schema
    assert all(t in schema.entities and (f == pending.WHOLE_TYPE or f in schema.entities[t].fields)
               for t, f in markers(service.store))
    with service.store.write_engine.begin() as conn:
        conn.execute(service.store.pending.delete())  # the ingester is past the writes
    assert passes(service, ASSET_CODES) is None


def test_a_deferred_write_that_cannot_be_marked_marks_every_type_once(
        site: FakeSite, service: CacheService, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write SG answered that the proxy could not learn, and whose markers cannot be made either
    (a bug, not the database): every cached type is marked once and the write is let go, where it
    made every read pass until the proxy restarted."""
    assets(site, 1)
    prime(service.store, SiteClient(site))

    def broken(*_args: Any) -> None:
        raise TypeError("a shape nobody foresaw")

    monkeypatch.setattr("cache.replica.effects.WriteEffects.outcome_unknown", broken)
    service.learner.defer("update", {"type": "Shot", "id": 1, "fields": []})
    assert passes(service, ASSET_CODES) == "pending-write"
    assert service.learner.all_recorded()
    assert {(t, pending.WHOLE_TYPE) for t in service.store.schema.entities} <= markers(service.store)
    with service.store.write_engine.begin() as conn:
        conn.execute(service.store.pending.delete())
    assert passes(service, ASSET_CODES) is None


def test_a_delete_by_a_float_id_is_learnt(site: FakeSite, service: CacheService) -> None:
    """``sg.delete("Asset", 3.0)`` (an id that went through pandas): SG retires Asset 3. The retired
    flag was stored for an ``int`` id only, and nothing marked: the Asset was served as active."""
    victim = assets(site, 2)[0]
    prime(service.store, SiteClient(site))
    assert learn(site, service, "delete", {"type": "Asset", "id": float(victim["id"])}) is True
    assert [e["code"] for e in service.read(ASSET_CODES)["entities"]] == ["a001"]
    assert learn(site, service, "revive", {"type": "Asset", "id": float(victim["id"])}) is True
    assert [e["code"] for e in service.read(ASSET_CODES)["entities"]] == ["a000", "a001"]
    assert_replica_is_sg_except_markers(site, service)


@pytest.mark.parametrize("entity_id", ["1", 1.5, True, None])
def test_a_retirement_by_an_id_that_is_no_integer_marks_the_type(service: CacheService, entity_id: Any) -> None:
    """Which entity SG retired for such an id is not known here: the whole type waits."""
    service.learn("delete", {"type": "Asset", "id": entity_id}, True)
    assert ("Asset", pending.WHOLE_TYPE) in markers(service.store)


def test_a_rename_of_a_type_whose_name_field_is_not_cached_marks_the_links_to_it(
        tmp_path: Path, db_url: str, site: FakeSite) -> None:
    """Sequence is cached, ``Sequence.code`` (its name) is not: the links to a Sequence show its name
    from the registry, which an update's answer did not reach (the name field is unknown to the
    replica). The links showing it were served with the old name; they now wait for the ingester."""
    schema = cached_schema(site)
    schema.entities["Sequence"].fields.pop("code")
    assert schema.identifier("Sequence") is None
    (tmp_path / "schema.yml").write_text(schema.to_yaml())
    svc = CacheService(db_url, tmp_path / "schema.yml", max_lag=0)
    try:
        p = site.create_direct("Project", {"name": "P"})
        proj = {"type": "Project", "id": p["id"]}
        seq = site.create_direct("Sequence", {"code": "SQ01", "project": proj})
        site.create_direct("Shot", {"code": "sh", "project": proj, "sg_sequence": {"type": "Sequence", "id": seq["id"]}})
        prime(svc.store, SiteClient(site))
        shots = {**ASSET_CODES, "type": "Shot", "return_fields": ["sg_sequence"]}
        assert svc.read(shots)["entities"][0]["sg_sequence"]["name"] == "SQ01"
        learn(site, svc, "update", wire("Sequence", seq["id"], {"code": "SQ01-renamed"}))
        assert passes(svc, shots) == "pending-write"
        assert_replica_is_sg_except_markers(site, svc)
        with svc.store.write_engine.begin() as conn:
            conn.execute(svc.store.pending.delete())
        svc.outcome_unknown("update", wire("Sequence", seq["id"], {"code": "SQ01-again"}))
        assert passes(svc, shots) == "pending-write"
    finally:
        svc.close()


def test_a_read_back_leaving_out_a_link_to_a_live_entity_leaves_the_row_to_the_ingester(
        site: FakeSite, service: CacheService) -> None:
    """SG retired a Version's Task and the ingester has not polled that: a read-back of the Version
    shows ``sg_task`` None while the replica holds the Task live (a cleared link or a retired Task:
    the replica cannot tell). Stored, the link was lost for good once SG showed it again on the
    Task's revival. The row is left queued for the ingester (which waits for its poll) and its
    type marked pending."""
    from .fakesg import FakeSGServer

    proj = {"type": "Project", "id": site.create_direct("Project", {"name": "p"})["id"]}
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    task = site.create_direct("Task", {"content": "comp", "project": proj, "entity": shot})
    version = site.create_direct("Version", {"code": "v1", "project": proj, "entity": shot, "sg_task": task})
    prime(service.store, SiteClient(site))
    site.delete_direct("Task", task["id"])
    items = [("Version", version["id"])]
    with service.store.write_engine.begin() as conn:
        service.store.queue_fetch(conn, items, "partial create answer")
    with FakeSGServer(site) as server:
        service.fetch_rows(f"{server.url}/api3/json", {"script_name": "pipeline", "script_key": "s3cret"},
                           items, None)
    assert ("Version", pending.WHOLE_TYPE) in markers(service.store)
    versions = service.store.tables["Version"]
    with service.store.engine.connect() as conn:
        assert conn.execute(sa.select(versions.c.sg_task__id)).scalar_one() == task["id"]
        assert not fetchqueue.is_empty(conn, service.store.fetch_queue)


def test_a_partial_answer_for_many_rows_is_read_back_whole(site: FakeSite, service: CacheService,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of 600 creates: the read-back read one page of 500, the other 100 stayed queued with no
    marker, so another proxy (its replica state up to a second old) served the type without them.
    Every chunk is read back now, up to a bound; the type is marked pending for what is left."""
    from cache.proxy import learning

    from .fakesg import FakeSGServer

    made = assets(site, 600)
    prime(service.store, SiteClient(site))
    more = [site.create_direct("Asset", {"code": f"b{i:03d}", "project": made[0]["project"]}) for i in range(600)]
    items = [("Asset", a["id"]) for a in more]
    with service.store.write_engine.begin() as conn:
        service.store.queue_fetch(conn, items, "partial create answer")
    auth = {"script_name": "pipeline", "script_key": "s3cret"}
    with FakeSGServer(site) as server:
        service.fetch_rows(f"{server.url}/api3/json", auth, items, None)
        assert markers(service.store) == frozenset()
        with service.store.engine.connect() as conn:
            assert len(conn.execute(sa.select(service.store.tables["Asset"].c.id)).all()) == 1200
            assert fetchqueue.is_empty(conn, service.store.fetch_queue)
        monkeypatch.setattr(learning, "MAX_FETCH_BACK", 1000)
        newest = [site.create_direct("Asset", {"code": f"c{i:04d}", "project": made[0]["project"]})
                  for i in range(1200)]
        items = [("Asset", a["id"]) for a in newest]
        with service.store.write_engine.begin() as conn:
            service.store.queue_fetch(conn, items, "partial create answer")
        service.fetch_rows(f"{server.url}/api3/json", auth, items, None)
        assert ("Asset", pending.WHOLE_TYPE) in markers(service.store)  # 200 left for the ingester


def test_a_read_back_after_a_clients_own_remove_is_stored(site: FakeSite, service: CacheService) -> None:
    """A client removes a Note from a Task's ``notes`` (mode remove): the answer is partial, so the
    row is read back. The removal is the client's own (SG applied it): it is taken out of the
    replica's list first, so the read-back is stored at once (it left the removed Note out while the
    replica held it live, which reads as a retirement not polled yet: the row stayed queued and the
    whole Task type pending until the ingester had polled twice)."""
    from .fakesg import FakeSGServer

    proj = {"type": "Project", "id": site.create_direct("Project", {"name": "p"})["id"]}
    n1 = site.create_direct("Note", {"subject": "a", "project": proj})
    n2 = site.create_direct("Note", {"subject": "b", "project": proj})
    task = site.create_direct("Task", {"content": "comp", "project": proj,
                                       "notes": [{"type": "Note", "id": n1["id"]}, {"type": "Note", "id": n2["id"]}]})
    prime(service.store, SiteClient(site))
    params = {"type": "Task", "id": task["id"], "fields": [
        {"field_name": "notes", "value": [{"type": "Note", "id": n1["id"]}], "multi_entity_update_mode": "remove"}]}
    to_fetch = service.learn("update", params, site._direct("update", params, True))
    assert to_fetch == [("Task", task["id"])]
    with FakeSGServer(site) as server:
        service.fetch_rows(f"{server.url}/api3/json", {"script_name": "pipeline", "script_key": "s3cret"},
                           to_fetch, None)
    assert ("Task", pending.WHOLE_TYPE) not in markers(service.store)
    with service.store.engine.connect() as conn:
        assert fetchqueue.is_empty(conn, service.store.fetch_queue)
        links = service.store.multi[("Task", "notes")]
        assert [r.child_id for r in conn.execute(sa.select(links.c.child_id))] == [n2["id"]]


def test_a_read_back_overtaken_by_another_proxys_write_marks_the_type(
        site: FakeSite, service: CacheService, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client adds an Asset to a Shot's ``assets`` through proxy A (a partial answer: the row is
    queued and read back); while A reads the row from SG, proxy B learns another write to the same
    Shot. A's read-back is then older than the replica's row and is not stored (the row stays
    queued for the ingester). It was not marked either: ``_fetch_page`` counted the overtaken row as
    read back, so a third proxy whose replica state was cached a moment before (the fetch queue is
    seen up to a second late; a long TTL here stands for that second) served the Shot's old
    ``assets``, without the client's Asset, after the client had SG's answer."""
    from cache.proxy import learning
    from cache.proxy import service as service_module

    from .fakesg import FakeSGServer

    proj = {"type": "Project", "id": site.create_direct("Project", {"name": "p"})["id"]}
    a1 = site.create_direct("Asset", {"code": "a1", "project": proj})
    a2 = site.create_direct("Asset", {"code": "a2", "project": proj})
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj, "assets": [{"type": "Asset", "id": a1["id"]}]})
    prime(service.store, SiteClient(site))
    monkeypatch.setattr(service_module, "REPLICA_STATE_TTL", 3600.0)
    third = CacheService(db_url, tmp_path / "schema.yml", max_lag=0, write_wait=0)
    try:
        read = {"type": "Shot", "return_fields": ["assets"], "return_only": "active",
                "filters": {"logical_operator": "and", "conditions": [
                    {"path": "id", "relation": "is", "values": [shot["id"]]}]},
                "paging": {"entities_per_page": 10, "current_page": 1}}
        before = third.read(read)["entities"][0]["assets"]  # its replica state: cached now
        assert [a["id"] for a in before] == [a1["id"]]
        add = {"type": "Shot", "id": shot["id"], "fields": [
            {"field_name": "assets", "value": [{"type": "Asset", "id": a2["id"]}], "multi_entity_update_mode": "add"}]}
        to_fetch = service.learn("update", add, site._direct("update", add, True), service.write_mark())
        assert to_fetch == [("Shot", shot["id"])]
        post_json = learning.upstream.post_json

        def read_then_overtaken(*args: Any, **kwargs: Any) -> Any:
            reply = post_json(*args, **kwargs)
            # proxy B learns another client's write to the Shot while A's read-back is on its way
            rename = {"type": "Shot", "id": shot["id"], "fields": [{"field_name": "code", "value": "renamed"}]}
            mark = service.write_mark()
            service.learn("update", rename, site._direct("update", rename, True), mark)
            return reply

        monkeypatch.setattr(learning.upstream, "post_json", read_then_overtaken)
        with FakeSGServer(site) as server:
            service.fetch_rows(f"{server.url}/api3/json", {"script_name": "pipeline", "script_key": "s3cret"},
                               to_fetch, None)
        expected = [a["id"] for a in site.find_direct("Shot", [["id", "is", shot["id"]]], ["assets"])[0]["assets"]]
        assert expected == [a1["id"], a2["id"]]
        try:
            got = third.read(read)["entities"][0]["assets"]
        except Passthrough as exc:
            assert exc.reason == "pending-write"
        else:
            assert [a["id"] for a in got] == expected, "the third proxy served the Shot's assets from before the add"
    finally:
        third.close()



def test_a_fetch_overtaken_through_the_other_side_of_a_pair_is_not_stored(site: FakeSite,
                                                                           service: CacheService) -> None:
    """The ingester reads a Shot again from SG (queued: another tool added an Asset to its ``assets``).
    After SG answered that read, a client removes the Shot from that Asset's ``shots`` through a
    proxy (SG's pair takes the Asset out of the Shot's ``assets`` again), learnt before the fetch
    stores the Shot. The replica's Shot did not hold the Asset yet, so the proxy's pair left the
    Shot's row alone, and only rows changed meanwhile were kept from the fetch: the fetch stored
    the older row, and the client read the Asset back in the Shot's ``assets``."""
    proj = {"type": "Project", "id": site.create_direct("Project", {"name": "p"})["id"]}
    a1 = site.create_direct("Asset", {"code": "a1", "project": proj})
    a2 = site.create_direct("Asset", {"code": "a2", "project": proj})
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj, "assets": [{"type": "Asset", "id": a1["id"]}]})
    prime(service.store, SiteClient(site))
    site.update_direct("Shot", shot["id"], {"assets": [{"type": "Asset", "id": a1["id"]}, {"type": "Asset", "id": a2["id"]}]})
    with service.store.write_engine.begin() as conn:
        service.store.queue_fetch(conn, [("Shot", shot["id"])], "test")

    class Racing(SiteClient):
        raced = False

        def find(self, entity_type: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            rows = super().find(entity_type, *args, **kwargs)
            if entity_type == "Shot" and not self.raced:
                self.raced = True
                remove = {"type": "Asset", "id": a2["id"], "fields": [
                    {"field_name": "shots", "value": [{"type": "Shot", "id": shot["id"]}],
                     "multi_entity_update_mode": "remove"}]}
                service.learn("update", remove, site._direct("update", remove, True), service.write_mark())
            return rows

    client = Racing(site)
    ing = Ingester(service.store, client, IngestConfig(batch=50, poll_interval=0.01))
    try:
        ing.process_fetch_queue()
    finally:
        ing.close()
    assert client.raced
    expected = site.find_direct("Shot", [["id", "is", shot["id"]]], ["assets"])[0]["assets"]
    assert [a["id"] for a in expected] == [a1["id"]]
    read = {"type": "Shot", "return_fields": ["assets"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": [
                {"path": "id", "relation": "is", "values": [shot["id"]]}]},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    try:
        got = service.read(read)["entities"][0]["assets"]
    except Passthrough as exc:
        assert exc.reason in ("pending-write", "pending-fetch")
    else:
        assert [a["id"] for a in got] == [a1["id"]], "the fetch put the Asset back in the Shot's assets"


def test_two_reads_recording_deferred_writes_at_once_never_drop_a_later_one(
        site: FakeSite, service: CacheService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reads both found one deferred write and both marked it; a second write was deferred
    meanwhile. Each read then took as many writes off the list as it had marked: the second took
    the newer write it never marked, and reads were served while its effects stood unmarked. Now
    one read records at a time (the other waits for it, then records the newer write)."""
    import threading

    assets(site, 1)
    prime(service.store, SiteClient(site))
    marking = threading.Barrier(2, timeout=10)
    release = threading.Event()
    mark_deferred = service.learner._mark_deferred

    def slow_mark(deferred: Any) -> None:
        mark_deferred(deferred)
        if threading.current_thread().name.startswith("sgcache-learn"):
            try:
                marking.wait(timeout=2)  # both reads' marking done (or only one got here)
            except threading.BrokenBarrierError:
                pass
            release.wait(10)

    monkeypatch.setattr(service.learner, "_mark_deferred", slow_mark)
    first = {"type": "Shot", "id": 1, "fields": [{"field_name": "code", "value": "a"}]}
    second = {"type": "Asset", "id": 1, "fields": [{"field_name": "code", "value": "b"}]}
    service.learner.defer("update", first)
    outcomes: list[str] = []

    def read() -> None:
        try:
            service.learner.record_unrecorded()
            outcomes.append("recorded")
        except Passthrough as exc:
            outcomes.append(exc.reason)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    time.sleep(2.5)  # both readers are in: one marking, one waiting for it
    service.learner.defer("update", second)  # deferred while they record
    release.set()
    for reader in readers:
        reader.join(10)
    assert outcomes == ["recorded", "recorded"]
    assert service.learner.all_recorded()
    assert ("Asset", "code") in markers(service.store), "the newer deferred write was dropped unmarked"


def test_a_deferred_write_is_recorded_without_waiting_for_a_read(site: FakeSite, service: CacheService) -> None:
    """A write whose learn the database did not take was marked only by this proxy's next read:
    with none coming, other proxies served what it changed until the ingester brought its events.
    Now it is recorded within about FLUSH_FIRST seconds on its own."""
    from .wait import wait_until

    assets(site, 1)
    prime(service.store, SiteClient(site))
    service.learner.defer("update", {"type": "Asset", "id": 1, "fields": [{"field_name": "code", "value": "b"}]})
    wait_until(lambda: ("Asset", "code") in markers(service.store), 10, "the deferred write's markers")
    wait_until(service.learner.all_recorded, 10, "the deferred write off the list")


@pytest.mark.parametrize("results", [[{"type": "Asset", "id": 1, "code": "b"}], {"type": "Asset"}, None])
def test_a_batch_answer_that_does_not_pair_with_its_requests_marks_what_they_may_change(
        site: FakeSite, service: CacheService, results: Any) -> None:
    """SG answers a batch with one result per request; an answer that does not pair with them
    (shorter, not a list) stored nothing and marked nothing, though SG applied the batch."""
    assets(site, 2)
    prime(service.store, SiteClient(site))
    batch = [{"request_type": "update", "type": "Asset", "id": 1, "fields": [{"field_name": "code", "value": "b"}]},
             {"request_type": "update", "type": "Asset", "id": 2, "fields": [{"field_name": "code", "value": "c"}]}]
    service.learn("batch", batch, results, service.write_mark())
    assert ("Asset", "code") in markers(service.store)
    assert passes(service, ASSET_CODES) == "pending-write"


def test_rows_left_queued_whose_types_cannot_be_marked_are_marked_later(
        site: FakeSite, service: CacheService, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial answer's rows stay queued and their types are marked for other proxies (whose
    replica state shows the queue up to a second late). When the database did not take the
    markers, nothing was kept: now every type is marked once it does."""
    assets(site, 1)
    prime(service.store, SiteClient(site))

    def fails(_types: Any) -> None:
        raise sa.exc.OperationalError("UPDATE", {}, Exception("database is locked"))

    monkeypatch.setattr(service.learner, "_mark_whole", fails)
    monkeypatch.setattr("cache.proxy.learning.FLUSH_FIRST", 60.0)  # recorded here by the read below
    service.left_queued(["Asset"])
    assert not service.learner.all_recorded()
    monkeypatch.undo()
    service.breaker.ok()
    service.learner.record_unrecorded()
    assert ("Asset", pending.WHOLE_TYPE) in markers(service.store)
