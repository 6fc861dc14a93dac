"""Tests of the fake SG site, driven by a real shotgun_api3 client over HTTP (no proxy)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import shotgun_api3

from tests.fakesg import (
    ERR_AUTH,
    FakeSGServer,
    FakeSite,
    load_fixture_schema,
    make_schema,
    wire_filters,
)

NOW = datetime(2024, 6, 15, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def site() -> FakeSite:
    s = FakeSite.basic()
    s.add_script("tester", "secret")
    s.set_clock(NOW)
    return s


@pytest.fixture
def server(site: FakeSite) -> Iterator[FakeSGServer]:
    with FakeSGServer(site) as srv:
        yield srv


@pytest.fixture
def sg(server: FakeSGServer) -> shotgun_api3.Shotgun:
    return shotgun_api3.Shotgun(server.url, script_name="tester", api_key="secret")


def ids(rows: list[dict]) -> list[int]:
    return [r["id"] for r in rows]


def events_of(site: FakeSite, since: int = 0) -> list[dict]:
    return site.events(since)


@pytest.fixture
def studio(sg: shotgun_api3.Shotgun) -> dict:
    """A project with two sequences, four shots, assets, steps and tasks."""
    p = sg.create("Project", {"name": "Alpha"})
    s1 = sg.create("Sequence", {"code": "SEQ01", "project": p})
    s2 = sg.create("Sequence", {"code": "SEQ02", "project": p})
    a1 = sg.create("Asset", {"code": "chair", "project": p, "sg_asset_type": "Prop"})
    a2 = sg.create("Asset", {"code": "Hero", "project": p, "sg_asset_type": "Character"})
    shots = [
        sg.create("Shot", {"code": "sh010", "project": p, "sg_sequence": s1, "sg_cut_in": 10,
                           "assets": [a1, a2], "sg_due_date": "2024-06-20"}),
        sg.create("Shot", {"code": "SH020", "project": p, "sg_sequence": s1, "sg_cut_in": 5,
                           "assets": [a1], "sg_status_list": "ip"}),
        sg.create("Shot", {"code": "sh030", "project": p, "sg_sequence": s2}),
        sg.create("Shot", {"code": "xx040", "project": p, "sg_cut_in": 20, "description": "Hello World"}),
    ]
    step = sg.create("Step", {"code": "Anim"})
    return {"project": p, "seqs": [s1, s2], "assets": [a1, a2], "shots": shots, "step": step}


# ---------------------------------------------------------------- auth / info

def test_info_is_bare(server: FakeSGServer) -> None:
    req = urllib.request.Request(server.url + "/api3/json", data=b'{"method_name":"info","params":[]}',
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        body = json.loads(resp.read())
    assert body["version"] == [8, 50, 0] and "results" not in body
    assert body["api_max_entities_per_page"] == 500


def test_auth_failures(site: FakeSite, server: FakeSGServer) -> None:
    bad = shotgun_api3.Shotgun(server.url, script_name="tester", api_key="wrong")
    with pytest.raises(shotgun_api3.AuthenticationFault):
        bad.find("Shot", [])
    unknown = shotgun_api3.Shotgun(server.url, script_name="nobody", api_key="secret")
    with pytest.raises(shotgun_api3.AuthenticationFault):
        unknown.find_one("Shot", [])
    site.add_human("jdoe", "pw", firstname="John", lastname="Doe")
    human = shotgun_api3.Shotgun(server.url, login="jdoe", password="pw")
    shot = human.create("Shot", {"code": "h1"}, ["created_by"])
    assert shot["created_by"]["name"] == "John Doe"
    ok = shotgun_api3.Shotgun(server.url, script_name="tester", api_key="secret")
    ok.set_session_uuid("abc-123")
    ok.find("Shot", [])
    site.revoke_script("tester")
    with pytest.raises(shotgun_api3.AuthenticationFault):
        ok.find("Shot", [])
    assert site.call("read", [{"script_name": "tester", "script_key": "secret"}, {"type": "Shot"}])[
        "error_code"] == ERR_AUTH
    assert site.request_auth[-1]["script_name"] == "tester"


# ---------------------------------------------------------------- CRUD

def test_create_find_update_roundtrip(sg: shotgun_api3.Shotgun, studio: dict) -> None:
    p = studio["project"]
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    shot = sg.create("Shot", {"code": "new", "project": p, "sg_last_review": when, "sg_frame_rate": 23.976,
                              "sg_data": {"a": [1, 2]}, "tags": ["x", "y"], "sg_omit": True,
                              "sg_link": {"url": "http://x", "name": "x", "link_type": "web"}},
                     ["sg_sequence", "created_at", "created_by", "assets", "sg_status_list"])
    assert shot["type"] == "Shot" and shot["code"] == "new"
    assert shot["sg_sequence"] is None and shot["assets"] == []
    assert shot["sg_last_review"] == when and shot["created_at"] == NOW
    assert shot["created_by"] == {"type": "ApiUser", "id": 1, "name": "tester"}
    assert shot["sg_status_list"] == "wtg"  # schema default
    found = sg.find_one("Shot", [["id", "is", shot["id"]]],
                        ["code", "sg_frame_rate", "sg_data", "tags", "sg_omit", "sg_link", "project"])
    assert found == {"type": "Shot", "id": shot["id"], "code": "new", "sg_frame_rate": 23.976,
                     "sg_data": {"a": [1, 2]}, "tags": ["x", "y"], "sg_omit": True,
                     "sg_link": {"url": "http://x", "name": "x", "link_type": "web"},
                     "project": {"type": "Project", "id": p["id"], "name": "Alpha"}}
    upd = sg.update("Shot", shot["id"], {"code": "renamed", "assets": studio["assets"][:1]})
    assert upd == {"type": "Shot", "id": shot["id"], "code": "renamed",
                   "assets": [{"type": "Asset", "id": studio["assets"][0]["id"], "name": "chair"}]}
    upd = sg.update("Shot", shot["id"], {"assets": [studio["assets"][1]]},
                    multi_entity_update_modes={"assets": "add"})
    assert ids(upd["assets"]) == ids(studio["assets"])
    upd = sg.update("Shot", shot["id"], {"assets": [studio["assets"][0]]},
                    multi_entity_update_modes={"assets": "remove"})
    assert ids(upd["assets"]) == [studio["assets"][1]["id"]]
    with pytest.raises(shotgun_api3.Fault, match="doesn't exist"):
        sg.update("Shot", shot["id"], {"sg_nope": 1})
    with pytest.raises(shotgun_api3.Fault):
        sg.update("Shot", shot["id"], {"sg_status_list": "bogus"})
    with pytest.raises(shotgun_api3.Fault):
        sg.update("Shot", 9999, {"code": "x"})


def test_delete_revive(sg: shotgun_api3.Shotgun, studio: dict) -> None:
    shot = studio["shots"][0]
    assert sg.delete("Shot", shot["id"]) is True
    assert sg.delete("Shot", shot["id"]) is False
    assert shot["id"] not in ids(sg.find("Shot", []))
    assert ids(sg.find("Shot", [], retired_only=True)) == [shot["id"]]
    assert sg.revive("Shot", shot["id"]) is True
    assert sg.revive("Shot", shot["id"]) is False
    assert shot["id"] in ids(sg.find("Shot", []))
    with pytest.raises(shotgun_api3.Fault):
        sg.delete("Shot", 12345)
    with pytest.raises(shotgun_api3.Fault):
        sg.revive("Shot", 12345)


def test_batch_and_rollback(site: FakeSite, sg: shotgun_api3.Shotgun, studio: dict) -> None:
    s1, s2 = studio["shots"][:2]
    res = sg.batch([
        {"request_type": "create", "entity_type": "Shot", "data": {"code": "b1"}},
        {"request_type": "update", "entity_type": "Shot", "entity_id": s1["id"], "data": {"code": "b2"}},
        {"request_type": "delete", "entity_type": "Shot", "entity_id": s2["id"]},
    ])
    assert res[0]["code"] == "b1" and res[1] == {"type": "Shot", "id": s1["id"], "code": "b2"} and res[2] is True
    before_events = site.last_event_id()
    before_shots = sg.find("Shot", [], ["code"])
    with pytest.raises(shotgun_api3.Fault):
        sg.batch([
            {"request_type": "create", "entity_type": "Shot", "data": {"code": "never"}},
            {"request_type": "update", "entity_type": "Shot", "entity_id": s1["id"], "data": {"code": "nope"}},
            {"request_type": "update", "entity_type": "Shot", "entity_id": 9999, "data": {"code": "x"}},
        ])
    assert sg.find("Shot", [], ["code"]) == before_shots
    assert site.last_event_id() == before_events
    nxt = sg.create("Shot", {"code": "after"})
    assert nxt["id"] == res[0]["id"] + 1  # ids of the failed batch were not consumed


# ---------------------------------------------------------------- filters

def test_filters(site: FakeSite, sg: shotgun_api3.Shotgun, studio: dict) -> None:
    sh = ids(studio["shots"])
    assert ids(sg.find("Shot", [["code", "is", "SH010"]])) == [sh[0]]  # case-insensitive
    assert ids(sg.find("Shot", [["code", "starts_with", "sh"]])) == sh[:3]
    assert ids(sg.find("Shot", [["code", "ends_with", "40"]])) == [sh[3]]
    assert ids(sg.find("Shot", [["description", "contains", "world"]])) == [sh[3]]
    assert ids(sg.find("Shot", [["description", "not_contains", "world"]])) == sh[:3]  # NULL kept
    assert ids(sg.find("Shot", [["code", "in", ["sh010", "XX040", "zz"]]])) == [sh[0], sh[3]]
    assert ids(sg.find("Shot", [["sg_cut_in", "is_not", 10]])) == sh[1:]  # NULL kept by is_not
    assert ids(sg.find("Shot", [["sg_cut_in", "is", None]])) == [sh[2]]
    assert ids(sg.find("Shot", [["sg_cut_in", "is_not", None]])) == [sh[0], sh[1], sh[3]]
    assert ids(sg.find("Shot", [["sg_cut_in", "not_in", [10, 20]]])) == [sh[1], sh[2]]
    assert ids(sg.find("Shot", [["sg_cut_in", "between", [6, None]]])) == [sh[0], sh[3]]
    assert ids(sg.find("Shot", [["sg_cut_in", "not_between", [6, 15]]])) == [sh[1], sh[3]]
    assert ids(sg.find("Shot", [["sg_cut_in", "greater_than", 5]])) == [sh[0], sh[3]]
    assert ids(sg.find("Shot", [["sg_status_list", "is", "ip"]])) == [sh[1]]
    # nested any/all groups
    flt = [{"filter_operator": "any", "filters": [
        ["sg_cut_in", "less_than", 6],
        {"filter_operator": "all", "filters": [["code", "contains", "0"], ["sg_sequence", "is", None]]},
    ]}]
    assert ids(sg.find("Shot", flt)) == [sh[1], sh[3]]
    assert ids(sg.find("Shot", [["code", "is", "sh030"], ["sg_cut_in", "is", 20]], filter_operator="any")) \
        == [sh[2], sh[3]]
    # entity fields
    s1 = studio["seqs"][0]
    assert ids(sg.find("Shot", [["sg_sequence", "is", s1]])) == sh[:2]
    assert ids(sg.find("Shot", [["sg_sequence", "is_not", s1]])) == sh[2:]
    assert ids(sg.find("Shot", [["sg_sequence", "in", [studio["seqs"][1], None]]])) == sh[2:]
    assert ids(sg.find("Shot", [["sg_sequence", "name_contains", "q02"]])) == [sh[2]]
    assert ids(sg.find("Shot", [["sg_sequence", "name_is", "seq01"]])) == sh[:2]
    assert ids(sg.find("Shot", [["sg_sequence", "type_is", "Sequence"]])) == sh[:3]
    assert ids(sg.find("Shot", [["sg_sequence", "type_is", None]])) == [sh[3]]
    # multi_entity: is means contains
    a1, a2 = studio["assets"]
    assert ids(sg.find("Shot", [["assets", "is", a2]])) == [sh[0]]
    assert ids(sg.find("Shot", [["assets", "is_not", a2]])) == sh[1:]
    assert ids(sg.find("Shot", [["assets", "is", None]])) == sh[2:]
    assert ids(sg.find("Shot", [["assets", "name_contains", "HAI"]])) == sh[:2]
    assert ids(sg.find("Shot", [["assets", "name_not_contains", "hero"]])) == sh[1:]
    # deep paths: single hop, multi hop (EXISTS), and as return fields
    assert ids(sg.find("Shot", [["sg_sequence.Sequence.code", "is", "seq02"]])) == [sh[2]]
    assert ids(sg.find("Shot", [["assets.Asset.sg_asset_type", "is", "Character"]])) == [sh[0]]
    assert ids(sg.find("Shot", [["project.Project.name", "is", "alpha"], ["sg_sequence.Sequence.code", "is", None]])) \
        == [sh[3]]
    rows = sg.find("Shot", [["id", "in", sh[:1]]], ["sg_sequence.Sequence.code", "sg_sequence.Sequence.project"])
    assert rows[0]["sg_sequence.Sequence.code"] == "SEQ01"
    assert rows[0]["sg_sequence.Sequence.project"]["name"] == "Alpha"
    # a hop naming the wrong type gives None
    site.create_direct("Task", {"content": "t", "entity": studio["assets"][0]})
    task = sg.find_one("Task", [], ["entity.Shot.code", "entity.Asset.code"])
    assert task["entity.Shot.code"] is None and task["entity.Asset.code"] == "chair"
    with pytest.raises(shotgun_api3.Fault, match="Invalid filter"):
        sg.find("Shot", [["sg_cut_in", "contains", "1"]])
    with pytest.raises(shotgun_api3.Fault, match="doesn't exist"):
        sg.find("Shot", [["sg_nope", "is", 1]])
    with pytest.raises(shotgun_api3.Fault, match="doesn't exist"):
        sg.find("Shot", [], ["sg_nope"])
    with pytest.raises(shotgun_api3.Fault, match="doesn't exist"):
        sg.find("NoSuchType", [])


def test_relative_date_filters(site: FakeSite, sg: shotgun_api3.Shotgun) -> None:
    rows = {}
    for name, delta in [("past2h", timedelta(hours=-2)), ("past3d", timedelta(days=-3)),
                        ("next2d", timedelta(days=2)), ("past40d", timedelta(days=-40))]:
        rows[name] = sg.create("Shot", {"code": name, "sg_last_review": NOW + delta,
                                        "sg_due_date": (NOW + delta).date().isoformat()})["id"]
    none_row = sg.create("Shot", {"code": "none"})["id"]

    def q(*flt: object) -> set[str]:
        return {r["code"] for r in sg.find("Shot", [list(flt)], ["code"])}

    assert q("sg_last_review", "in_last", 1, "DAY") == {"past2h"}
    assert q("sg_last_review", "in_last", 1, "WEEK") == {"past2h", "past3d"}
    assert q("sg_last_review", "in_last", 2, "MONTH") == {"past2h", "past3d", "past40d"}
    assert q("sg_last_review", "not_in_last", 1, "WEEK") == {"next2d", "past40d"}  # NULL excluded
    assert q("sg_last_review", "in_next", 3, "DAY") == {"next2d"}
    assert q("sg_last_review", "in_calendar_day", 0) == {"past2h"}
    assert q("sg_due_date", "in_calendar_month", 0) == {"past2h", "past3d", "next2d"}
    assert q("sg_due_date", "in_calendar_month", -1) == {"past40d"}  # 40 days back is May 6th
    assert q("sg_due_date", "in_calendar_month", -2) == set()
    assert q("sg_due_date", "in_calendar_year", 0) == {"past2h", "past3d", "next2d", "past40d"}
    assert q("sg_due_date", "in_last", 3, "DAY") == {"past2h", "past3d"}
    assert q("sg_last_review", "less_than", NOW) == {"past2h", "past3d", "past40d"}
    assert none_row not in rows.values()


# ---------------------------------------------------------------- sorting and paging

def test_sorts(sg: shotgun_api3.Shotgun, studio: dict) -> None:
    sh = ids(studio["shots"])
    asc = sg.find("Shot", [], ["sg_cut_in"], order=[{"field_name": "sg_cut_in", "direction": "asc"}])
    assert ids(asc) == [sh[2], sh[1], sh[0], sh[3]]  # NULL first ascending
    desc = sg.find("Shot", [], ["sg_cut_in"], order=[{"field_name": "sg_cut_in", "direction": "desc"}])
    assert ids(desc) == [sh[3], sh[0], sh[1], sh[2]]  # NULL last descending
    by_seq = sg.find("Shot", [], order=[{"field_name": "sg_sequence", "direction": "desc"},
                                        {"column": "code", "direction": "desc"}])
    assert ids(by_seq) == [sh[2], sh[1], sh[0], sh[3]]  # entity by name; ties by code desc
    deep = sg.find("Shot", [], order=[{"field_name": "sg_sequence.Sequence.code", "direction": "asc"},
                                      {"field_name": "sg_cut_in", "direction": "asc"}])
    assert ids(deep) == [sh[3], sh[1], sh[0], sh[2]]
    text = sg.find("Shot", [], order=[{"field_name": "code", "direction": "asc"}])
    assert ids(text) == sh  # case-insensitive: sh010 < SH020 < sh030 < xx040
    ties = sg.find("Shot", [], order=[{"field_name": "project", "direction": "desc"}])
    assert ids(ties) == sh  # ties broken by id ascending


@pytest.mark.parametrize("version", [(8, 50, 0), (7, 0, 0)])
def test_paging_1001_rows(site: FakeSite, server: FakeSGServer, version: tuple[int, int, int]) -> None:
    site.version = version
    for i in range(1001):
        site.create_direct("Shot", {"code": f"s{i:04d}", "sg_cut_in": i % 7}, events=False)
    sg = shotgun_api3.Shotgun(server.url, script_name="tester", api_key="secret")
    site.reset_counts()
    rows = sg.find("Shot", [], ["code"], order=[{"field_name": "sg_cut_in", "direction": "asc"}])
    assert len(rows) == 1001 and len(set(ids(rows))) == 1001
    reads = [p for m, p in site.requests if m == "read"]
    flag = "return_paging_info_without_counts" if version >= (7, 4, 0) else "return_paging_info"
    assert all(p[flag] is True for p in reads)
    assert [p["paging"]["current_page"] for p in reads] == [1, 2, 3]
    assert site.count("read", type="Shot") == 3
    limited = sg.find("Shot", [], limit=600)
    assert len(limited) == 600
    page2 = sg.find("Shot", [], ["code"], order=[{"field_name": "code", "direction": "asc"}], limit=10, page=2)
    assert [r["code"] for r in page2] == [f"s{i:04d}" for i in range(10, 20)]


def test_paging_info_envelope(site: FakeSite) -> None:
    for i in range(5):
        site.create_direct("Shot", {"code": str(i)}, events=False)
    auth = {"script_name": "tester", "script_key": "secret"}
    base = {"type": "Shot", "filters": wire_filters([]), "return_only": "active",
            "paging": {"entities_per_page": 2, "current_page": 3}}
    res = site.call("read", [auth, {**base, "return_paging_info": True}])["results"]
    assert res["paging_info"]["entity_count"] == 5 and len(res["entities"]) == 1
    res = site.call("read", [auth, {**base, "return_paging_info_without_counts": True,
                                    "paging": {"entities_per_page": 2, "current_page": 2}}])["results"]
    assert res["paging_info"] == {"has_next_page": True}


# ---------------------------------------------------------------- links and names

def test_link_names_and_retired_links(site: FakeSite, sg: shotgun_api3.Shotgun, studio: dict) -> None:
    user = site.add_human("ann", "pw", firstname="Ann", lastname="Lee")
    task = sg.create("Task", {"content": "Animate", "entity": studio["shots"][0], "step": studio["step"],
                              "task_assignees": [user]})
    version = sg.create("Version", {"code": "v001", "sg_task": task, "entity": studio["shots"][0]},
                        ["sg_task", "entity"])
    assert version["sg_task"]["name"] == "Animate"
    assert version["entity"]["name"] == "sh010"
    assert sg.find_one("Task", [], ["task_assignees"])["task_assignees"][0]["name"] == "Ann Lee"
    note = sg.create("Note", {"subject": "Fix it", "note_links": [version, studio["shots"][0]]})
    # retire the shot: links to it vanish from entity and multi_entity fields
    sg.delete("Shot", studio["shots"][0]["id"])
    v = sg.find_one("Version", [["id", "is", version["id"]]], ["entity", "entity.Shot.code"])
    assert v["entity"] is None and v["entity.Shot.code"] is None
    n = sg.find_one("Note", [["id", "is", note["id"]]], ["note_links"])
    assert n["note_links"] == [{"type": "Version", "id": version["id"], "name": "v001"}]
    assert sg.find("Version", [["entity", "is", None]], ["id"])[0]["id"] == version["id"]
    # renaming the target renames the link
    sg.update("Task", task["id"], {"content": "Animation"})
    assert sg.find_one("Version", [], ["sg_task"])["sg_task"]["name"] == "Animation"


def test_include_archived_projects(sg: shotgun_api3.Shotgun) -> None:
    live = sg.create("Project", {"name": "live"})
    old = sg.create("Project", {"name": "old", "archived": True})
    sg.create("Shot", {"code": "a", "project": live})
    sg.create("Shot", {"code": "b", "project": old})
    sg.create("Shot", {"code": "c"})
    assert len(sg.find("Shot", [])) == 3
    assert [r["code"] for r in sg.find("Shot", [], ["code"], include_archived_projects=False)] == ["a", "c"]
    assert [r["name"] for r in sg.find("Project", [], ["name"], include_archived_projects=False)] == ["live"]


# ---------------------------------------------------------------- events

def test_events_for_each_change_kind(site: FakeSite, sg: shotgun_api3.Shotgun, studio: dict) -> None:
    start = site.last_event_id()
    shot = sg.create("Shot", {"code": "ev", "sg_cut_in": 3, "assets": [studio["assets"][0]]})
    evs = events_of(site, start)
    assert evs[0]["event_type"] == "Shotgun_Shot_New"
    assert evs[0]["meta"] == {"type": "new_entity", "entity_type": "Shot", "entity_id": shot["id"]}
    assert evs[0]["user"] == {"type": "ApiUser", "id": 1}
    changes = {e["attribute_name"]: e["meta"] for e in evs[1:] if e["event_type"] == "Shotgun_Shot_Change"}
    assert set(changes) == {"code", "sg_cut_in", "assets", "sg_status_list"}
    # Shot.assets is paired with Asset.shots: the Asset gets a backref event
    back = [e for e in evs if e["event_type"] == "Shotgun_Asset_Change"]
    assert [(e["attribute_name"], e["meta"]["actual_attribute_changed"]) for e in back] == [("shots", "Shot.assets")]
    assert all(m["in_create"] for m in changes.values())
    assert changes["sg_cut_in"]["field_data_type"] == "number" and changes["sg_cut_in"]["new_value"] == 3
    assert changes["assets"]["added"] == [{"type": "Asset", "id": studio["assets"][0]["id"], "name": "chair"}]

    start = site.last_event_id()
    sg.update("Shot", shot["id"], {"sg_cut_in": 4, "assets": [studio["assets"][1]]})
    sg.update("Shot", shot["id"], {"sg_cut_in": 4})  # no-op: no event
    evs = [e for e in events_of(site, start) if e["event_type"] == "Shotgun_Shot_Change"]
    assert [e["attribute_name"] for e in evs] == ["sg_cut_in", "assets"]
    assert evs[0]["meta"]["old_value"] == 3 and evs[0]["meta"]["new_value"] == 4
    assert "in_create" not in evs[0]["meta"]
    assert ids(evs[1]["meta"]["added"]) == [studio["assets"][1]["id"]]
    assert ids(evs[1]["meta"]["removed"]) == [studio["assets"][0]["id"]]
    assert "old_value" not in evs[1]["meta"]

    start = site.last_event_id()
    sg.delete("Shot", shot["id"])
    sg.revive("Shot", shot["id"])
    evs = events_of(site, start)
    assert [e["event_type"] for e in evs] == ["Shotgun_Shot_Change", "Shotgun_Shot_Retirement",
                                              "Shotgun_Shot_Change", "Shotgun_Shot_Revival"]
    assert evs[0]["attribute_name"] == "retirement_date" and evs[0]["meta"]["new_value"].endswith("UTC")
    assert evs[1]["meta"]["type"] == "entity_retirement"
    assert evs[2]["meta"]["old_value"] == evs[0]["meta"]["new_value"] and evs[2]["meta"]["new_value"] is None
    assert "type" not in evs[3]["meta"]

    # EventLogEntry.entity reads None while the entity is retired
    sg.delete("Shot", shot["id"])
    read = sg.find("EventLogEntry", [["id", "greater_than", start]], ["entity", "event_type", "meta", "created_at", "session_uuid", "project", "user"])
    assert all(e["entity"] is None for e in read)
    assert read[0]["created_at"] == NOW


def test_backref_pair_events(site: FakeSite, sg: shotgun_api3.Shotgun, studio: dict) -> None:
    shot, shot2 = studio["shots"][:2]
    start = site.last_event_id()
    task = sg.create("Task", {"content": "comp", "entity": shot})
    assert ids(sg.find_one("Shot", [["id", "is", shot["id"]]], ["tasks"])["tasks"]) == [task["id"]]
    evs = events_of(site, start)
    fwd = next(e for e in evs if e["attribute_name"] == "entity")
    back = next(e for e in evs if e["event_type"] == "Shotgun_Shot_Change")
    assert back["attribute_name"] == "tasks" and back["entity"] == {"type": "Shot", "id": shot["id"]}
    assert back["meta"]["actual_attribute_changed"] == "Task.entity"
    assert back["meta"]["original_event_log_entry_id"] == fwd["id"]
    assert back["meta"]["entity_type"] == "Task" and back["meta"]["entity_id"] == task["id"]
    assert ids(back["meta"]["added"]) == [task["id"]] and back["meta"]["in_create"] is True

    # moving the task through the multi side updates Task.entity and both shots
    start = site.last_event_id()
    sg.update("Shot", shot2["id"], {"tasks": [task]}, multi_entity_update_modes={"tasks": "add"})
    assert sg.find_one("Task", [["id", "is", task["id"]]], ["entity"])["entity"]["id"] == shot2["id"]
    assert sg.find_one("Shot", [["id", "is", shot["id"]]], ["tasks"])["tasks"] == []
    evs = events_of(site, start)
    kinds = [(e["entity"]["type"], e["attribute_name"], e["meta"].get("actual_attribute_changed")) for e in evs]
    assert kinds == [("Shot", "tasks", None), ("Shot", "tasks", "Shot.tasks"), ("Task", "entity", "Shot.tasks")]
    assert evs[2]["meta"]["old_value"]["id"] == shot["id"] and evs[2]["meta"]["new_value"]["id"] == shot2["id"]


def test_entity_side_moves_through_the_multi_side(site: FakeSite, sg: shotgun_api3.Shotgun, studio: dict) -> None:
    """Sequence.shots <-> Shot.sg_sequence: adding a Shot to a Sequence takes it from its old one."""
    s1, s2 = studio["seqs"]
    sh030 = studio["shots"][2]
    start = site.last_event_id()
    sg.update("Sequence", s1["id"], {"shots": [sh030]}, multi_entity_update_modes={"shots": "add"})
    assert sg.find_one("Shot", [["id", "is", sh030["id"]]], ["sg_sequence"])["sg_sequence"]["id"] == s1["id"]
    assert ids(sg.find_one("Sequence", [["id", "is", s1["id"]]], ["shots"])["shots"])[-1] == sh030["id"]
    assert sg.find_one("Sequence", [["id", "is", s2["id"]]], ["shots"])["shots"] == []
    kinds = [(e["entity"]["type"], e["entity"]["id"], e["attribute_name"], e["meta"].get("actual_attribute_changed"))
             for e in events_of(site, start)]
    assert kinds == [("Sequence", s1["id"], "shots", None), ("Sequence", s2["id"], "shots", "Sequence.shots"),
                     ("Shot", sh030["id"], "sg_sequence", "Sequence.shots")]
    # setting the multi side clears the entity side of the shots it drops
    sg.update("Sequence", s1["id"], {"shots": [sh030]})
    assert sg.find("Shot", [["sg_sequence", "is", None]], ["code"]) == [
        {"type": "Shot", "id": s["id"], "code": s["code"]} for s in studio["shots"] if s["id"] != sh030["id"]]


def test_multi_pairs_and_self_pairs(site: FakeSite, sg: shotgun_api3.Shotgun, studio: dict) -> None:
    a1, a2 = studio["assets"]
    sh010, sh020 = studio["shots"][:2]
    assert ids(sg.find_one("Asset", [["id", "is", a1["id"]]], ["shots"])["shots"]) == [sh010["id"], sh020["id"]]
    sg.update("Asset", a1["id"], {"shots": [sh020]}, multi_entity_update_modes={"shots": "remove"})
    assert ids(sg.find_one("Shot", [["id", "is", sh020["id"]]], ["assets"])["assets"]) == []
    sg.update("Asset", a2["id"], {"parents": [a1]})
    assert ids(sg.find_one("Asset", [["id", "is", a1["id"]]], ["assets"])["assets"]) == [a2["id"]]
    start = site.last_event_id()
    v = sg.create("Version", {"code": "v1", "project": studio["project"]})
    task = sg.create("Task", {"content": "t", "project": studio["project"]})
    note = sg.create("Note", {"subject": "n", "project": studio["project"], "note_links": [sh010, v],
                              "tasks": [task]})
    for t, row in (("Shot", sh010), ("Version", v), ("Task", task)):
        assert ids(sg.find_one(t, [["id", "is", row["id"]]], ["notes"])["notes"]) == [note["id"]]
    backs = sorted((e["entity"]["type"], e["attribute_name"], e["meta"]["actual_attribute_changed"])
                   for e in events_of(site, start) if e["meta"] and e["meta"].get("actual_attribute_changed"))
    assert backs == [("Shot", "notes", "Note.note_links"), ("Task", "notes", "Note.tasks"),
                     ("Version", "notes", "Note.note_links")]


def test_event_switches_and_held_ids(site: FakeSite, server: FakeSGServer, sg: shotgun_api3.Shotgun) -> None:
    site.add_script("quiet", "k2", generate_events=False)
    quiet = shotgun_api3.Shotgun(server.url, script_name="quiet", api_key="k2")
    start = site.last_event_id()
    quiet.create("Shot", {"code": "silent"})
    site.events_enabled = False
    sg.create("Shot", {"code": "off"})
    site.events_enabled = True
    assert site.last_event_id() == start

    held = site.hold_event_ids(2)
    sg.create("Shot", {"code": "late"})  # New + code + status = 3 events; first two held
    visible = ids(sg.find("EventLogEntry", [["id", "greater_than", start]]))
    assert visible == [held[1] + 1]
    assert site.release_held() == held
    assert ids(sg.find("EventLogEntry", [["id", "greater_than", start]])) == [*held, held[1] + 1]

    held = site.hold_event_ids(1)
    sg.update("Shot", 1, {"code": "rolled back"})
    assert site.drop_held() == held
    assert held[0] not in ids(sg.find("EventLogEntry", []))
    noise = site.add_noise_events()
    rows = sg.find("EventLogEntry", [["id", "in", noise]], ["event_type", "meta"])
    assert {r["event_type"] for r in rows} >= {"Toolkit_App_Startup", "Shotgun_User_Login",
                                               "Shotgun_Reading_Change", "Shotgun_Attachment_View"}
    assert any(r["meta"] is None for r in rows)


def test_schema_methods_and_events(site: FakeSite, sg: shotgun_api3.Shotgun) -> None:
    schema = sg.schema_read()
    assert schema["Shot"]["sg_status_list"]["data_type"]["value"] == "status_list"
    assert sg.schema_entity_read()["Shot"]["name"]["value"] == "Shot"
    assert list(sg.schema_field_read("Shot", "code")) == ["code"]
    start = site.last_event_id()
    site.add_field("Shot", "sg_extra", "text")
    site.change_field_type("Shot", "sg_extra", "number")
    assert sg.schema_field_read("Shot", "sg_extra")["sg_extra"]["data_type"]["value"] == "number"
    evs = events_of(site, start)
    assert [e["event_type"] for e in evs] == ["Shotgun_DisplayColumn_New", "Shotgun_DisplayColumn_Change",
                                              "Shotgun_DisplayColumn_Change"]
    assert evs[1]["meta"]["old_value"] == "text" and evs[1]["meta"]["new_value"] == "number"
    read = sg.find_one("EventLogEntry", [["id", "is", evs[0]["id"]]], ["entity"])
    assert read["entity"] == {"type": "DisplayColumn", "id": 1, "name": "sg_extra"}
    sg.create("Shot", {"code": "x", "sg_extra": 5})
    assert sg.find_one("Shot", [["sg_extra", "is", 5]], ["code"])["code"] == "x"


def test_task_template(site: FakeSite, sg: shotgun_api3.Shotgun, studio: dict) -> None:
    tmpl = site.add_task_template(7, "Basic shot", [{"content": "Layout"},
                                                    {"content": "Anim", "step": studio["step"]}])
    start = site.last_event_id()
    shot = sg.create("Shot", {"code": "tt", "project": studio["project"], "task_template": tmpl}, ["tasks"])
    tasks = sg.find("Task", [["entity", "is", shot]], ["content", "step", "project"])
    assert [t["content"] for t in tasks] == ["Layout", "Anim"]
    assert tasks[1]["step"]["name"] == "Anim" and tasks[0]["project"]["name"] == "Alpha"
    assert shot["tasks"] == [{"type": "Task", "id": t["id"], "name": t["content"]} for t in tasks]
    assert sum(e["event_type"] == "Shotgun_Task_New" for e in events_of(site, start)) == 2


# ---------------------------------------------------------------- server behaviour

def test_server_echo_malformed_and_restart(site: FakeSite, server: FakeSGServer) -> None:
    body = b"field=1&other=\xff"
    req = urllib.request.Request(server.url + "/upload/publish_thumbnail?x=1", data=body, method="POST")
    with urllib.request.urlopen(req) as resp:
        echo = json.loads(resp.read())["fake_sg_echo"]
    assert echo == {"method": "POST", "path": "/upload/publish_thumbnail?x=1",
                    "body_sha256": hashlib.sha256(body).hexdigest()}
    assert site.raw_requests[-1][:2] == ("POST", "/upload/publish_thumbnail?x=1")
    assert site.raw_requests[-1][3] == body
    req = urllib.request.Request(server.url + "/api3/json", data=b"{not json", method="POST")
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 200
        err = json.loads(resp.read())
    assert err["exception"] is True and "Invalid" in err["message"]

    port = server.port
    sg = shotgun_api3.Shotgun(server.url, script_name="tester", api_key="secret")
    sg.find("Shot", [])  # a keep-alive connection is now open
    server.stop_listening()
    with pytest.raises(OSError):
        sg.find("Shot", [])
    server.start()
    assert server.port == port
    assert sg.find("Shot", []) == []


def test_tls(site: FakeSite, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with FakeSGServer(site, tls_cert=str(cert), tls_key=str(key)) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        sg = shotgun_api3.Shotgun(srv.url, script_name="tester", api_key="secret", ca_certs=str(cert))
        assert sg.create("Shot", {"code": "secure"})["code"] == "secure"


def test_fixture_schema_site() -> None:
    loaded = load_fixture_schema()
    if loaded is None:
        pytest.skip("fixture schema not available")
    site = FakeSite(*loaded)
    p = site.create_direct("Project", {"name": "P"})
    seq = site.create_direct("Sequence", {"code": "S", "project": p})
    shot = site.create_direct("Shot", {"code": "A", "sg_sequence": seq, "project": p}, ["sg_sequence"])
    assert shot["sg_sequence"]["name"] == "S"
    assert site.find_direct("Shot", [["sg_sequence.Sequence.code", "is", "s"]], ["code"])[0]["code"] == "A"


def test_make_schema_shape() -> None:
    schema = make_schema({"Thing": {"code": "text", "owner": ("entity", ["HumanUser"]),
                                    "state": ("status_list", ["a", "b"])}})
    thing = schema["Thing"]
    assert set(thing) == {"id", "created_at", "updated_at", "created_by", "updated_by", "project", "code",
                          "owner", "state"}
    assert thing["owner"]["properties"]["valid_types"]["value"] == ["HumanUser"]
    assert thing["state"]["properties"]["valid_values"]["value"] == ["a", "b"]
    assert thing["created_by"]["data_type"]["value"] == "entity"


def test_the_replica_comparison_reads_every_page(tmp_path: Path) -> None:
    """tests/replica.py's comparison with the site reads the replica page by page: with more rows than
    one page (500), a row missing from the replica is still found, and a complete replica reads equal.
    (It read only the first page once: the 16-writer test at its default 60 s then failed with rows
    "missing" that were there.)"""
    from cache.replica.store import Store

    from .replica import SiteClient, cached_schema, make_project, prime, replica_read, site_differences

    site = FakeSite.basic()
    proj = make_project(site)
    for i in range(1001):
        site.create_direct("Sequence", {"code": f"SQ{i:04d}", "project": proj}, events=False)
    store = Store.open(f"sqlite:///{tmp_path / 'replica.db'}", cached_schema(site))
    try:
        prime(store, SiteClient(site))
        assert len(replica_read(store, "Sequence", ["code"], False)) == 1001
        assert site_differences(store, site) == []
        last = site.create_direct("Sequence", {"code": "SQlate", "project": proj}, events=False)
        assert site_differences(store, site) == [
            f"Sequence (retired=False) differs: rows missing from the replica: [{last['id']}]"]
    finally:
        store.dispose()
