"""The oracle: every read the fake SG answers, the proxy answers the same, from the replica.

One site holds data of every cached data type of ``basic_schema()`` (None values, unicode, empty
multi_entity lists, retired rows and retired linked entities, an archived project, polymorphic links).
Each case runs ``find`` straight against the fake SG (the expected answer), then through the proxy, and
checks that the answers are equal and that the fake SG saw no read (a hit). Cases marked PASS are the
ones the engine deliberately passes upstream (docs/semantics.md lists them): for those the answer must
still be equal, and the fake SG must have served the read.

A second site holds 1,001 Shots for paging, in both of the client's paging modes and two page sizes,
and the rename test (a linked entity's identifier changes through the proxy).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import shotgun_api3

from .databases import fresh_db_url
from .fakesg import FakeSite
from .fakesg.schema_data import basic_schema
from .rig import KEY, SCRIPT, Rig

#: Everything of basic_schema() that the cache can hold (image is never cached).
RULES = "+*\n-*.image\n-EventLogEntry\n"
SCHEMA = basic_schema()


def all_fields(entity_type: str) -> list[str]:
    return [f for f, spec in SCHEMA[entity_type].items() if spec["data_type"]["value"] != "image"]


def L(entity_type: str, entity_id: int) -> dict[str, Any]:  # noqa: N802 - a link literal
    return {"type": entity_type, "id": entity_id}


# ---------------------------------------------------------------------------------- data
def populate(site: FakeSite) -> None:
    """A small studio with every data type; ids are fixed by creation order (asserted)."""
    c = site.create_direct

    def make(entity_type: str, expect_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        made = c(entity_type, fields)
        assert made["id"] == expect_id, (entity_type, made["id"], expect_id)
        return L(entity_type, made["id"])

    p1 = make("Project", 1, {"name": "Demo", "sg_status": "Active", "sg_description": "main show"})
    p2 = make("Project", 2, {"name": "Archive ü", "archived": True, "sg_status": "Lost"})
    p3 = make("Project", 3, {"name": "bidding", "sg_status": None, "sg_description": None})
    h1 = make("HumanUser", 1, {"name": "Ann Lee", "firstname": "Ann", "lastname": "Lee", "login": "ann",
                               "email": "ann@example.com", "sg_status_list": "act"})
    h2 = make("HumanUser", 2, {"name": "Bob Ünal", "firstname": "Bob", "lastname": "Ünal", "login": "bob",
                               "created_by": h1, "sg_status_list": "act"})
    h3 = make("HumanUser", 3, {"name": "Cy Gone", "firstname": "Cy", "lastname": "Gone", "login": "cy",
                               "created_by": h2, "sg_status_list": "dis"})
    h4 = make("HumanUser", 4, {"name": "dee", "firstname": None, "login": "dee", "created_by": h3,
                               "sg_status_list": None})
    g1 = make("Group", 1, {"code": "Leads", "users": [h1, h2]})
    make("Group", 2, {"code": "empty group", "users": []})
    g3 = make("Group", 3, {"code": "gone group", "users": [h3]})
    for u, groups in ((h1, [g1]), (h2, [g1, g3]), (h3, [g3])):
        site.update_direct("HumanUser", u["id"], {"groups": groups})
    st1 = make("Step", 1, {"code": "Comp", "short_name": "cmp", "color": "255,0,0", "entity_type": "Shot"})
    st2 = make("Step", 2, {"code": "anim", "short_name": None, "color": "pipeline_step", "entity_type": "Asset"})
    make("Step", 3, {"code": None, "color": None, "entity_type": None})
    q1 = make("Sequence", 1, {"code": "SQ01", "project": p1, "description": "first", "sg_status_list": "ip"})
    q2 = make("Sequence", 2, {"code": "sq02", "project": p1, "description": None, "sg_status_list": None})
    q3 = make("Sequence", 3, {"code": "SQ03 ü", "project": p2, "sg_status_list": "fin"})
    q4 = make("Sequence", 4, {"code": "SQ04 gone", "project": p1, "created_by": h3})
    a1 = make("Asset", 1, {"code": "Hero", "sg_asset_type": "Character", "project": p1, "tags": ["a", "B"]})
    a2 = make("Asset", 2, {"code": "prop_ß", "sg_asset_type": "Prop", "project": p1, "parents": [a1]})
    a3 = make("Asset", 3, {"code": "Env", "sg_asset_type": "Environment", "project": p2, "parents": [a1, a2]})
    a4 = make("Asset", 4, {"code": "gone asset", "sg_asset_type": None, "project": p1})
    a5 = make("Asset", 5, {"code": None, "sg_asset_type": "Prop", "project": None, "sg_status_list": None})
    tt = site.add_task_template(1, "Basic TT", [{"content": "layout", "step": st2}, {"content": "Anim"}])
    shots: list[dict[str, Any]] = [
        {"code": "sh010", "description": "first shot", "sg_status_list": "ip", "sg_sequence": q1, "project": p1,
         "assets": [a1], "sg_cut_in": 1001, "sg_cut_out": 1100, "sg_cut_duration": 100, "sg_frame_rate": 24.0,
         "sg_completion": 50, "sg_timecode": 3600000, "sg_budget": 1000.5, "sg_omit": False,
         "sg_due_date": "2024-01-31", "sg_last_review": "2024-01-31T12:00:00Z", "sg_shot_type": "Hero",
         "sg_color": "255,0,0", "sg_uuid": "0b9a4b56-26c5-4c8f-9a9e-0e6b7d1f0a01", "tags": ["a", "b"],
         "sg_data": {"k": 1, "nested": [1, 2]},
         "sg_link": {"content_type": None, "link_type": "web", "name": "site", "url": "https://example.com"},
         "sg_footage": "12-04", "sg_entity_type": "Shot", "sg_related": a1, "created_by": h1, "updated_by": h2},
        {"code": "SH020", "description": None, "sg_status_list": "fin", "sg_sequence": q2, "project": p1,
         "assets": [a1, a2], "sg_cut_in": 1010, "sg_cut_out": 1020, "sg_cut_duration": 10, "sg_frame_rate": 23.976,
         "sg_completion": 100, "sg_timecode": 0, "sg_budget": -1.25, "sg_omit": True,
         "sg_due_date": "2024-02-29", "sg_last_review": "2024-02-29T23:59:59Z", "sg_shot_type": "FX",
         "sg_color": "pipeline_step", "sg_uuid": "0B9A4B56-26C5-4C8F-9A9E-0E6B7D1F0A02", "tags": [],
         "sg_data": [1, "two"], "sg_footage": "0-01", "sg_entity_type": "Asset", "sg_related": q1,
         "created_by": h2},
        {"code": "sh030_ü", "sg_status_list": None, "sg_sequence": None, "project": p2, "assets": [],
         "sg_cut_in": None, "sg_frame_rate": None, "sg_completion": None, "sg_budget": None,
         "sg_due_date": None, "sg_last_review": None, "sg_shot_type": None, "sg_related": None,
         "created_by": h3},
        {"code": None, "sg_status_list": "wtg", "sg_sequence": q3, "project": p2, "assets": [a3, a4],
         "sg_cut_in": 0, "sg_cut_out": 0, "sg_cut_duration": 0, "sg_frame_rate": 0.0, "sg_completion": 0,
         "sg_timecode": 1, "sg_budget": 0.0, "sg_due_date": "2023-12-31", "sg_last_review": "2023-12-31T00:00:00Z",
         "sg_shot_type": "Background", "sg_entity_type": None, "sg_related": a4},
        {"code": "Ünïcode ☃ shot", "description": "Straße", "sg_status_list": "ip", "sg_sequence": q4,
         "project": p3, "assets": [a4], "sg_cut_in": -5, "sg_cut_out": 5, "sg_frame_rate": 25.0,
         "sg_completion": 25, "sg_budget": 99.99, "sg_omit": True, "sg_due_date": "2024-01-01",
         "sg_last_review": "2024-01-01T00:00:01Z", "sg_shot_type": "Hero", "sg_related": q4},
        {"code": "a%_b\\c", "sg_status_list": "rev", "sg_sequence": q1, "project": None, "assets": [a2, a3],
         "sg_cut_in": 1001, "sg_cut_out": 1001, "sg_frame_rate": 24.0, "sg_completion": 50,
         "sg_due_date": "2024-01-31", "sg_last_review": "2024-01-31T12:00:00Z", "sg_color": "0,0,255",
         "sg_related": q2, "created_by": h4},
        {"code": "sh070", "sg_status_list": "fin", "sg_sequence": q2, "project": p1, "assets": [a5],
         "sg_cut_in": 1100, "task_template": tt, "sg_related": a5},
        {"code": "retired shot", "sg_status_list": "ip", "sg_sequence": q1, "project": p1, "assets": [a1],
         "sg_cut_in": 1005},
        {"code": "Sh010", "sg_status_list": "hld", "sg_sequence": q1, "project": p1,
         "sg_cut_in": 1001, "sg_frame_rate": 24.0},
    ]
    shot_links = [make("Shot", i + 1, fields) for i, fields in enumerate(shots)]
    s1, s2, s3, s4, s5, s6, s7, s8, s9 = shot_links
    # Shot 7's task template made Tasks 1 and 2.
    tk = [L("Task", 1), L("Task", 2)]
    tk.append(make("Task", 3, {"content": "Comp", "entity": s1, "step": st1, "project": p1, "sg_status_list": "ip",
                               "task_assignees": [h1], "start_date": "2024-01-02", "due_date": "2024-01-31",
                               "duration": 480, "color": "255,0,0", "sg_priority": "1", "created_by": h1}))
    tk.append(make("Task", 4, {"content": "anim ü", "entity": a1, "step": st2, "project": p1,
                               "task_assignees": [g1, h2], "start_date": None, "due_date": "2024-03-01",
                               "duration": None, "sg_priority": "2"}))
    tk.append(make("Task", 5, {"content": None, "entity": q1, "project": p1, "task_assignees": [],
                               "sg_status_list": None, "sg_priority": None}))
    tk.append(make("Task", 6, {"content": "orphan", "entity": None, "project": p2, "task_assignees": [h3, g3]}))
    tk.append(make("Task", 7, {"content": "on retired", "entity": s8, "project": p1, "task_assignees": [h4]}))
    tk.append(make("Task", 8, {"content": "Comp", "entity": s2, "step": st1, "project": p1,
                               "task_assignees": [h2, h1], "sg_status_list": "fin"}))
    tk.append(make("Task", 9, {"content": "gone task", "entity": s1, "project": p1}))
    tk.append(make("Task", 10, {"content": "on gone asset", "entity": a4, "project": p1}))
    api_user = site.find_direct("ApiUser", [["firstname", "is", SCRIPT]])[0]
    f1 = make("PublishedFileType", 1, {"code": "Image", "description": "frames"})
    make("PublishedFileType", 2, {"code": "cache"})
    v1 = make("Version", 1, {"code": "sh010_v001", "entity": s1, "sg_task": tk[2], "project": p1, "user": h1,
                             "sg_first_frame": 1001, "sg_path_to_movie": "/mov/a.mov",
                             "sg_uploaded_movie": {"link_type": "upload", "name": "a.mov", "url": "https://x/a",
                                                   "content_type": "video/quicktime"}})
    v2 = make("Version", 2, {"code": "hero_v001", "entity": a1, "sg_task": tk[3], "project": p1,
                             "user": L("ApiUser", api_user["id"]), "sg_first_frame": None})
    make("Version", 3, {"code": "sh020_v002", "entity": s2, "sg_task": tk[8], "project": p2, "user": h3,
                             "sg_first_frame": 1})
    make("Version", 4, {"code": "no link", "entity": None, "project": None, "user": None})
    make("Version", 5, {"code": "on gone", "entity": a4, "sg_task": tk[9], "project": p1, "user": h2})
    pf1 = make("PublishedFile", 1, {"code": "sh010_comp_v001", "name": "comp", "entity": s1, "task": tk[2],
                                    "published_file_type": f1, "version_number": 1, "version": v1, "project": p1,
                                    "path": {"link_type": "local", "name": "x.exr", "local_path": "/p/x.exr",
                                             "url": "file:///p/x.exr", "content_type": None}})
    make("PublishedFile", 2, {"code": "hero_geo", "name": None, "entity": a1, "version_number": None, "project": p1})
    for v, pfs in ((v1, [pf1]), (v2, [])):
        site.update_direct("Version", v["id"], {"published_files": pfs})
    pl1 = make("Playlist", 1, {"code": "Dailies", "versions": [v1, v2], "locked": True,
                               "sg_date_and_time": "2024-01-31T18:30:00Z", "project": p1})
    make("Playlist", 2, {"code": "empty", "versions": [], "locked": False, "project": p2})
    for v, pls in ((v1, [pl1]), (v2, [pl1])):
        site.update_direct("Version", v["id"], {"playlists": pls})
    make("Note", 1, {"subject": "Looks good", "content": "ok", "user": h1, "project": p1,
                     "note_links": [s1, a1, v1, q1], "tasks": [tk[2]], "addressings_to": [h2, g1],
                     "sg_status_list": "opn"})
    make("Note", 2, {"subject": "fix ü", "user": L("ApiUser", api_user["id"]), "project": p1,
                     "note_links": [s2], "tasks": [], "addressings_to": [], "sg_status_list": "clsd"})
    make("Note", 3, {"subject": None, "user": None, "project": p2, "note_links": [a4, s8],
                     "addressings_to": [h3], "sg_status_list": None})
    make("Note", 4, {"subject": "seq note", "project": p1, "note_links": [q2, q4], "tasks": [tk[6]]})
    make("TaskTemplate", 2, {"code": "Empty TT", "description": "unused"})
    # Retire some rows, some of them linked from others.
    for t, i in (("HumanUser", h3["id"]), ("Group", g3["id"]), ("Sequence", q4["id"]), ("Asset", a4["id"]),
                 ("Shot", s8["id"]), ("Task", tk[8]["id"]), ("Version", 5)):
        assert site.delete_direct(t, i)
    del s3, s4, s5, s6, s7, s9, a3


def make_rig(tmp_path: Any, db_url: str, site: FakeSite) -> Iterator[Rig]:
    with Rig(tmp_path, db_url, site, rules=RULES, proxy=["sgcache_max_lag=0"]) as rig:
        yield rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    populate(site)
    yield from make_rig(tmp_path_factory.mktemp("oracle"), module_db_url, site)


@pytest.fixture(scope="module")
def clients(rig: Rig) -> tuple[shotgun_api3.Shotgun, shotgun_api3.Shotgun]:
    sg = rig.client()
    sg.find_one("Project", [])  # new credentials pass once; SG accepting them enables hits
    return sg, rig.direct()


# ---------------------------------------------------------------------------------- cases
HIT, PASS = True, False


def case(entity_type: str, filters: Any, fields: list[str] | None = None, hit: bool = HIT, **kw: Any) -> Any:
    label = json.dumps([entity_type, filters, fields, kw], ensure_ascii=False, default=str)
    return pytest.param(entity_type, filters, fields, kw, hit, id=label[:180])


def run(sg: Any, entity_type: str, filters: Any, fields: list[str] | None, kw: dict[str, Any]) -> Any:
    try:
        if kw.pop("one", False):
            return sg.find_one(entity_type, filters, fields, **kw)
        return sg.find(entity_type, filters, fields, **kw)
    except shotgun_api3.Fault as exc:  # SG's own error must come through unchanged
        return type(exc), str(exc)


def wire(path: str, relation: str, values: list[Any], op: str = "and") -> dict[str, Any]:
    """A filter in wire form (the client sends a dict as is)."""
    return {"logical_operator": op, "conditions": [{"path": path, "relation": relation, "values": values}]}


def scalar_cases(field: str, one: Any, two: Any, low: Any, high: Any, ordered: bool = True,
                 not_between: bool = False) -> list[Any]:
    """Operators of a scalar field on Shot, with two stored values and a range. ``not_between``:
    SG's reference lists it for the field's type (number and currency only); else it passes."""
    out = [
        case("Shot", [[field, "is", one]]),
        case("Shot", [[field, "is", None]]),
        case("Shot", [[field, "is_not", one]]),
        case("Shot", [[field, "is_not", None]]),
        case("Shot", [[field, "in", [one, two]]]),
        case("Shot", [[field, "in", [one, None]]]),
        case("Shot", wire(field, "in", [])),  # the client cannot send an empty list for other paths than id
        case("Shot", [[field, "not_in", [one]]]),
        case("Shot", [[field, "not_in", [one, None]]]),
        case("Shot", wire(field, "not_in", [])),
    ]
    if ordered:
        out += [
            case("Shot", [[field, "less_than", high]]),
            case("Shot", [[field, "greater_than", low]]),
            case("Shot", [[field, "between", [low, high]]]),
            case("Shot", [[field, "between", [low, None]]]),
            case("Shot", [[field, "between", [None, high]]]),
            case("Shot", [[field, "not_between", [low, high]]], hit=HIT if not_between else PASS),
            case("Shot", [[field, "less_than", None]], hit=PASS),  # a comparison with None: SG's rule unknown
        ]
    return out


SCALARS: list[Any] = [
    *scalar_cases("sg_cut_in", 1001, 0, 0, 1010, not_between=True),
    *scalar_cases("sg_cut_duration", 100, 0, 1, 100),
    *scalar_cases("sg_completion", 50, 100, 25, 50),
    *scalar_cases("sg_timecode", 3600000, 0, 0, 1),
    *scalar_cases("sg_frame_rate", 24.0, 23.976, 0.0, 24.0),
    *scalar_cases("sg_budget", 1000.5, -1.25, -1.25, 99.99, not_between=True),
    *scalar_cases("sg_due_date", "2024-01-31", "2023-12-31", "2024-01-01", "2024-02-29"),
    *scalar_cases("sg_last_review", "2024-01-31T12:00:00Z", "2023-12-31T00:00:00Z",
                  "2024-01-01T00:00:01Z", "2024-02-29T23:59:59Z"),
    *scalar_cases("id", 1, 2, 2, 5, not_between=True),
    *scalar_cases("sg_status_list", "ip", "fin", None, None, ordered=False),
    *scalar_cases("sg_shot_type", "Hero", "FX", None, None, ordered=False),
    *scalar_cases("sg_color", "255,0,0", "pipeline_step", None, None, ordered=False),
    *scalar_cases("sg_uuid", "0b9a4b56-26c5-4c8f-9a9e-0e6b7d1f0a01", "x", None, None, ordered=False),
    *scalar_cases("sg_footage", "12-04", "0-01", None, None, ordered=False),
    *scalar_cases("sg_entity_type", "Shot", "Asset", None, None, ordered=False),
    *scalar_cases("code", "sh010", "SH020", None, None, ordered=False),
    case("Shot", [["code", "is", "SH010"]]),  # text is case-insensitive
    case("Shot", [["code", "is", "ÜNÏCODE ☃ SHOT"]]),
    case("Shot", [["code", "in", ["SH030_Ü", "sh020"]]]),
    case("Shot", [["code", "not_in", ["SH010", None]]]),
    case("Shot", [["code", "contains", "H0"]]),
    case("Shot", [["code", "contains", "ü"]]),
    case("Shot", [["code", "contains", "%"]]),
    case("Shot", [["code", "contains", "_"]]),
    case("Shot", [["code", "contains", "\\"]]),
    case("Shot", [["code", "not_contains", "sh"]]),
    case("Shot", [["code", "starts_with", "sh0"]]),
    case("Shot", [["code", "starts_with", "üN"]]),
    case("Shot", [["code", "ends_with", "_Ü"]]),
    case("Shot", [["code", "ends_with", "☃ SHOT"]]),
    case("Shot", [["description", "contains", "STRASSE"]]),  # no case folding beyond lower()
    case("Shot", [["description", "contains", "straße"]]),
    case("Shot", [["code", "contains", None]], hit=PASS),  # a None pattern: SG's rule unknown
    case("Shot", [["sg_status_list", "is", "IP"]]),  # status/list values match exactly
    case("Shot", [["sg_shot_type", "in", ["hero", "FX"]]]),
    case("Shot", [["sg_uuid", "is", "0B9A4B56-26C5-4C8F-9A9E-0E6B7D1F0A02"]]),
    case("Shot", [["sg_omit", "is", True]]),
    case("Shot", [["sg_omit", "is", False]]),
    case("Shot", [["sg_omit", "is_not", True]]),
    case("Shot", [["sg_omit", "is_not", False]]),
    case("Shot", [["sg_omit", "is", None]], hit=PASS),  # checkbox is never null on SG: no sure rule
    case("Project", [["archived", "is", True]]),
    case("Project", [["sg_status", "in", ["Active", None]]]),
    case("Project", [["name", "is", "archive Ü"]]),
    case("Step", [["entity_type", "is", "Shot"]]),
    case("Step", [["color", "not_in", ["255,0,0"]]]),
    case("Playlist", [["locked", "is", True]]),
    case("Playlist", [["sg_date_and_time", "greater_than", "2024-01-01T00:00:00Z"]]),
    case("Task", [["start_date", "is", None]]),
    case("Task", [["due_date", "between", ["2024-01-01", "2024-02-01"]]]),
    case("Task", [["duration", "greater_than", 0]]),
    case("Task", [["sg_priority", "is_not", "1"]]),
    case("Version", [["sg_path_to_movie", "starts_with", "/MOV"]]),
    case("HumanUser", [["email", "ends_with", "@EXAMPLE.com"]]),
    case("ApiUser", [["generate_event_log_entries", "is", True]]),
    # Not filterable on SG: the engine passes, SG's error comes back.
    case("Shot", [["sg_link", "is", None]], hit=PASS),
    case("Shot", [["sg_data", "is", None]], hit=PASS),
    case("Shot", [["code", "less_than", "b"]], hit=PASS),
    case("Shot", [["sg_cut_in", "contains", 1]], hit=PASS),
    # tag_list filters: which Tag entity a name matches is SG's business.
    case("Shot", [["tags", "is", "a"]], hit=PASS),
    case("Shot", [["tags", "name_contains", "a"]], hit=PASS),
    # Relative dates depend on SG's clock and the site's time zone.
    case("Shot", [["sg_due_date", "in_last", 7, "DAY"]], hit=PASS),
    case("Shot", [["sg_last_review", "not_in_last", 1, "YEAR"]], hit=PASS),
    case("Shot", [["sg_last_review", "in_next", 2, "WEEK"]], hit=PASS),
    case("Shot", [["sg_due_date", "not_in_next", 1, "MONTH"]], hit=PASS),
    case("Shot", [["sg_last_review", "in_last", 3, "HOUR"]], hit=PASS),
    case("Shot", [["sg_due_date", "in_calendar_day", 0]], hit=PASS),
    case("Shot", [["sg_due_date", "in_calendar_week", -1]], hit=PASS),
    case("Shot", [["sg_last_review", "in_calendar_month", 0]], hit=PASS),
    case("Shot", [["sg_last_review", "in_calendar_year", -1]], hit=PASS),
]


def entity_cases(entity_type: str, field: str, one: dict[str, Any], two: dict[str, Any], other_type: str,
                 name: str, multi: bool = False) -> list[Any]:
    low = name.lower()
    return [
        case(entity_type, [[field, "is", one]]),
        case(entity_type, [[field, "is", None]]),
        case(entity_type, [[field, "is_not", one]]),
        case(entity_type, [[field, "is_not", None]]),
        case(entity_type, [[field, "in", [one, two]]]),
        case(entity_type, [[field, "in", [one, None]]]),
        case(entity_type, [[field, "not_in", [one]]]),
        case(entity_type, [[field, "not_in", [two, None]]]),
        case(entity_type, [[field, "type_is", other_type]]),
        case(entity_type, [[field, "type_is", None]]),
        case(entity_type, [[field, "type_is_not", other_type]]),
        case(entity_type, [[field, "type_is_not", None]]),
        case(entity_type, [[field, "name_is", name.upper()]], hit=PASS if multi else HIT),
        case(entity_type, [[field, "name_contains", low[1:3]]]),
        case(entity_type, [[field, "name_not_contains", low[1:3]]]),
        # SG's reference lists neither for a link field: passed
        case(entity_type, [[field, "name_starts_with", low[:2].upper()]], hit=PASS),
        case(entity_type, [[field, "name_ends_with", low[-2:]]], hit=PASS),
    ]


ENTITIES: list[Any] = [
    *entity_cases("Shot", "sg_sequence", L("Sequence", 1), L("Sequence", 2), "Sequence", "SQ01"),
    case("Shot", [["sg_sequence", "is", L("Sequence", 4)]]),  # a retired link reads as None
    case("Shot", [["sg_sequence", "is_not", L("Sequence", 4)]]),
    *entity_cases("Shot", "sg_related", L("Asset", 1), L("Sequence", 1), "Asset", "hero"),
    case("Shot", [["sg_related", "is", L("Sequence", 99)]]),
    *entity_cases("Shot", "project", L("Project", 1), L("Project", 2), "Project", "Demo"),
    *entity_cases("Shot", "created_by", L("HumanUser", 1), L("HumanUser", 3), "ApiUser", "Ann Lee"),
    case("Shot", [["task_template", "is", L("TaskTemplate", 1)]]),
    case("Shot", [["task_template", "name_is", "basic tt"]]),
    *entity_cases("Task", "entity", L("Shot", 1), L("Asset", 1), "Asset", "sh010"),
    case("Task", [["entity", "type_is", "Sequence"]]),
    case("Task", [["entity", "name_contains", "ü"]]),
    *entity_cases("Version", "user", L("HumanUser", 1), L("ApiUser", 1), "ApiUser", "Ann Lee"),
    *entity_cases("Shot", "assets", L("Asset", 1), L("Asset", 2), "Asset", "prop_ß", multi=True),
    case("Shot", [["assets", "is", L("Asset", 4)]]),  # a retired entity in the list is not there
    case("Shot", [["assets", "name_is", "PROP_SS"]], hit=PASS),
    *entity_cases("Task", "task_assignees", L("HumanUser", 1), L("Group", 1), "Group", "Leads", multi=True),
    case("Task", [["task_assignees", "type_is", "HumanUser"]]),
    case("Task", [["task_assignees", "type_is_not", "HumanUser"]]),
    *entity_cases("Note", "note_links", L("Shot", 1), L("Version", 1), "Version", "SQ01", multi=True),
    case("Note", [["note_links", "in", [L("Sequence", 2), L("Asset", 4)]]]),
    *entity_cases("Shot", "tasks", L("Task", 1), L("Task", 3), "Task", "Comp", multi=True),
    case("Asset", [["parents", "is", L("Asset", 1)]]),
    case("Asset", [["parents", "name_ends_with", "O"]], hit=PASS),
    case("Group", [["users", "is", None]]),
    case("Group", [["users", "name_not_contains", "ann"]]),
    case("Project", [["users", "is_not", None]]),
    case("Playlist", [["versions", "name_starts_with", "SH010"]], hit=PASS),
]

DEEP: list[Any] = [
    case("Shot", [["sg_sequence.Sequence.code", "is", "sq01"]]),
    case("Shot", [["sg_sequence.Sequence.code", "is", None]]),
    case("Shot", [["sg_sequence.Sequence.code", "is_not", "sq01"]]),
    case("Shot", [["sg_sequence.Sequence.description", "contains", "IRS"]]),
    case("Shot", [["sg_sequence.Sequence.project.Project.name", "is", "demo"]]),
    case("Shot", [["sg_sequence.Sequence.project", "is", L("Project", 2)]]),
    case("Shot", [["sg_related.Asset.code", "is", "Hero"]]),  # polymorphic: other types give None
    case("Shot", [["sg_related.Asset.code", "is", None]]),
    case("Shot", [["sg_related.Sequence.sg_status_list", "in", ["ip", None]]]),
    case("Shot", [["project.Project.archived", "is", True]]),
    case("Shot", [["project.Project.archived", "is_not", True]]),
    case("Shot", [["created_by.HumanUser.created_by.HumanUser.login", "is", "ann"]]),
    case("HumanUser", [["created_by.HumanUser.firstname", "is", "ann"]]),
    case("HumanUser", [["created_by.HumanUser.firstname", "is", None]]),
    case("Task", [["entity.Shot.sg_sequence.Sequence.code", "is", "SQ01"]]),
    case("Task", [["entity.Shot.code", "starts_with", "sh"]]),
    case("Task", [["entity.Asset.sg_asset_type", "is", "Character"]]),
    case("Task", [["entity.Shot.assets", "is", L("Asset", 2)]]),
    case("Version", [["sg_task.Task.step.Step.code", "is", "comp"]]),
    case("Version", [["user.HumanUser.login", "is_not", "ann"]]),
    # multi_entity hops in filters: EXISTS over the linked entities of that type
    case("Shot", [["assets.Asset.code", "is", "hero"]]),
    case("Shot", [["assets.Asset.code", "is_not", "hero"]]),
    case("Shot", [["assets.Asset.code", "is", None]]),
    case("Shot", [["assets.Asset.sg_asset_type", "in", ["Prop", "Environment"]]]),
    case("Shot", [["assets.Asset.project.Project.name", "contains", "ü"]]),
    case("Shot", [["assets.Asset.parents.Asset.code", "is", "hero"]]),
    case("Task", [["task_assignees.HumanUser.login", "is", "bob"]]),
    case("Task", [["task_assignees.Group.code", "starts_with", "lea"]]),
    case("Note", [["note_links.Shot.sg_sequence.Sequence.code", "is", "SQ02"]]),
    case("Note", [["note_links.Version.entity.Shot.code", "is", "sh010"]]),
    case("Group", [["users.HumanUser.sg_status_list", "is", "dis"]]),
]

GROUPS: list[Any] = [
    case("Shot", [["code", "is", "sh010"], ["sg_cut_in", "less_than", 1]], filter_operator="any"),
    case("Shot", [["sg_status_list", "is", "ip"],
                  {"filter_operator": "any", "filters": [["sg_cut_in", "is", None], ["sg_cut_in", "greater_than", 1000],
                                                         {"filter_operator": "all", "filters": [
                                                             ["code", "contains", "☃"], ["sg_omit", "is", True]]}]}]),
    case("Shot", [{"filter_operator": "any", "filters": [
        {"filter_operator": "all", "filters": [["assets", "is", None], ["project", "is", L("Project", 2)]]},
        {"filter_operator": "all", "filters": [["sg_sequence.Sequence.code", "is", "sq02"],
                                               {"filter_operator": "any", "filters": [["sg_cut_in", "is", 1100]]}]},
    ]}]),
    case("Shot", [], filter_operator="any", hit=PASS),  # an empty "or": SG's answer is not documented
    case("Shot", {"logical_operator": "or", "conditions": [
        {"path": "code", "relation": "is", "values": ["sh010"]},
        {"logical_operator": "and", "conditions": []}]}),  # an empty "and" is true
    case("Shot", {"logical_operator": "and", "conditions": [
        {"path": "code", "relation": "is", "values": ["sh010"]},
        {"logical_operator": "or", "conditions": []}]}, hit=PASS),
    case("Shot", wire("assets", "in", [])),
    case("Shot", wire("assets", "not_in", [])),
    case("Shot", wire("sg_sequence", "in", [])),
    case("Shot", wire("sg_sequence", "not_in", [])),
    case("Shot", wire("assets.Asset.code", "in", [])),
    case("Shot", wire("assets.Asset.code", "not_in", [])),
    case("Shot", [["sg_cut_in", "is", 1001], ["sg_cut_in", "is_not", 1001]]),
    case("Task", [["entity", "type_is", "Shot"], ["entity.Shot.sg_cut_in", "between", [1000, 1010]],
                  ["task_assignees", "is_not", None]], filter_operator="any"),
]

RETURNS: list[Any] = [
    case("Shot", [], all_fields("Shot")),
    case("Sequence", [], all_fields("Sequence")),
    case("Asset", [], all_fields("Asset")),
    case("Task", [], all_fields("Task")),
    case("Version", [], all_fields("Version")),
    case("PublishedFile", [], all_fields("PublishedFile")),
    case("PublishedFileType", [], all_fields("PublishedFileType")),
    case("HumanUser", [], all_fields("HumanUser")),
    case("ApiUser", [], all_fields("ApiUser")),
    case("Group", [], all_fields("Group")),
    case("Note", [], all_fields("Note")),
    case("Playlist", [], all_fields("Playlist")),
    case("Project", [], all_fields("Project")),
    case("Step", [], all_fields("Step")),
    case("TaskTemplate", [], all_fields("TaskTemplate")),
    case("Task", [], ["entity.Shot.code", "entity.Shot.sg_sequence.Sequence.code", "entity.Asset.code",
                      "entity.Shot.sg_sequence", "entity.Shot.project.Project.archived", "step.Step.color",
                      "entity.Sequence.shots", "entity.Shot.assets", "entity.Shot.sg_frame_rate",
                      "entity.Shot.sg_omit", "entity.Shot.sg_data", "entity.Shot.tags"]),
    case("Task", [], ["task_assignees.HumanUser.login", "entity.Shot.assets.Asset.code"]),  # through multi: None
    case("Version", [], ["entity.Shot.code", "sg_task.Task.entity.Shot.code", "user.HumanUser.login",
                         "user.ApiUser.firstname", "sg_task.Task.task_assignees", "entity.Asset.parents"]),
    case("HumanUser", [], ["created_by.HumanUser.firstname", "created_by.HumanUser.created_by.HumanUser.name",
                           "created_by.HumanUser.groups"]),
    case("Shot", [], ["code", "code", "id", "type", "task_template", "task_template.TaskTemplate.code", "tasks"]),
    case("Shot", [], ["image"], hit=PASS),  # never cached: SG serves expiring URLs
    case("Shot", [], ["sg_nope"], hit=PASS),  # SG's error comes back
    case("Shot", [["code", "is", "nothing like this"]], ["code", "assets"]),  # empty result
    case("Shot", [["id", "in", []]], ["code"]),
    case("Shot", [], ["code"], one=True),
    case("Shot", [["code", "is", "nope"]], ["code"], one=True),
    case("Shot", [["sg_cut_in", "is", 1001]], ["code"], one=True, order=[{"field_name": "code", "direction": "desc"}]),
    case("Shot", [], ["code", "assets"], limit=3, page=2),
    case("Shot", [], ["code"], limit=4),
    case("Shot", [], ["code"], limit=2, page=50),
    case("Task", [], ["content", "entity"], limit=3, order=[{"field_name": "entity", "direction": "desc"}]),
    case("Shot", [], ["code", "sg_cut_in"], retired_only=True),
    case("Asset", [["code", "contains", "o"]], ["code", "parents"], retired_only=True),
    case("Shot", [], ["code", "project"], include_archived_projects=False),
    case("Sequence", [], ["code"], include_archived_projects=False),
    case("Task", [["project", "is", L("Project", 2)]], ["content"], include_archived_projects=False),
    case("Project", [], ["name"], include_archived_projects=False),
    case("Shot", [], ["code"], additional_filter_presets=[{"preset_name": "LATEST", "latest_by": "BY_PIPELINE_STEP_NUMBER_AND_ENTITIES_CREATED_AT"}], hit=PASS),
]


def sorts(entity_type: str, *keys: tuple[str, str], hit: bool = HIT, fields: list[str] | None = None) -> Any:
    order = [{"field_name": f, "direction": d} for f, d in keys]
    return case(entity_type, [], fields or ["code"] + [f for f, _ in keys], hit=hit, order=order)


SORTABLE = ["code", "description", "sg_status_list", "sg_sequence", "sg_cut_in", "sg_cut_duration", "sg_frame_rate",
            "sg_completion", "sg_timecode", "sg_budget", "sg_omit", "sg_due_date", "sg_last_review", "sg_shot_type",
            "sg_color", "sg_uuid", "sg_footage", "sg_entity_type", "task_template", "sg_related", "project",
            "created_by", "created_at", "id"]
SORTS: list[Any] = [
    *[sorts("Shot", (f, d)) for f in SORTABLE for d in ("asc", "desc")],
    sorts("Shot", ("sg_status_list", "asc"), ("sg_cut_in", "desc")),
    sorts("Shot", ("sg_omit", "desc"), ("sg_frame_rate", "asc"), ("code", "desc")),
    sorts("Shot", ("sg_sequence.Sequence.code", "desc"), ("code", "asc")),
    sorts("Shot", ("sg_sequence.Sequence.project.Project.name", "asc"), ("sg_cut_in", "asc")),
    sorts("Shot", ("sg_related.Asset.code", "asc"), ("id", "desc")),
    sorts("Shot", ("project.Project.archived", "desc"), ("sg_sequence", "desc")),
    sorts("Task", ("entity", "asc"), ("content", "desc"), fields=["content", "entity"]),
    sorts("Task", ("entity.Shot.code", "desc"), fields=["content", "entity"]),
    sorts("Task", ("step.Step.code", "asc"), ("due_date", "desc"), fields=["content", "step"]),
    sorts("Version", ("user", "desc"), fields=["code", "user"]),
    sorts("HumanUser", ("created_by.HumanUser.firstname", "asc"), fields=["name"]),
    sorts("Step", ("color", "asc"), ("entity_type", "desc"), fields=["code"]),
    sorts("Shot", ("assets.Asset.code", "desc"), ("code", "asc")),  # through a multi hop: every value None
    sorts("Shot", ("assets", "asc"), hit=PASS),  # SG's order for a multi_entity field is not documented
    sorts("Shot", ("sg_data", "asc"), hit=PASS),  # not sortable here
    sorts("Shot", ("tags", "asc"), hit=PASS),
]


def pad_ids(n: int = 200) -> list[int]:
    return list(range(10_000, 10_000 + n))


def pad_links(*types: str, n: int = 200) -> list[Any]:
    return [L(types[i % len(types)], 10_000 + i) for i in range(n)]


#: in/not_in lists long enough to be bound as one parameter (cache/read/limits.py MAX_INLINE_VALUES)
LONG: list[Any] = [
    case("Shot", [["id", "in", [1, 3, *pad_ids()]]]),
    case("Shot", [["id", "not_in", [1, 3, *pad_ids()]]]),
    case("Shot", [["sg_cut_in", "in", [1001, None, *pad_ids()]]]),
    case("Shot", [["sg_cut_in", "not_in", [1001, *pad_ids()]]]),
    case("Shot", [["sg_cut_in", "not_in", [1001, None, *pad_ids()]]]),
    case("Shot", [["sg_frame_rate", "in", [24.0, 23.976, *[float(i) / 7 for i in pad_ids()]]]]),
    case("Shot", [["code", "in", ["SH030_Ü", "sh020", *[f"pad{i}" for i in pad_ids()]]]]),
    case("Shot", [["code", "not_in", ["SH010", None, *[f"pad{i}" for i in pad_ids()]]]]),
    case("Shot", [["sg_status_list", "in", ["ip", *[f"s{i}" for i in pad_ids()]]]]),
    case("Shot", [["sg_due_date", "not_in", ["2024-01-31", *[f"2000-01-{i % 28 + 1:02d}" for i in range(100)]]]]),
    case("Shot", [["sg_sequence", "in", [L("Sequence", 1), L("Sequence", 4), *pad_links("Sequence")]]]),
    case("Shot", [["sg_sequence", "in", [L("Sequence", 2), None, *pad_links("Sequence")]]]),
    case("Shot", [["sg_sequence", "not_in", [L("Sequence", 1), *pad_links("Sequence")]]]),
    case("Shot", [["sg_sequence", "not_in", [L("Sequence", 1), None, *pad_links("Sequence")]]]),
    case("Shot", [["sg_related", "in", [L("Asset", 1), L("Sequence", 1), *pad_links("Asset", "Sequence", "Shot")]]]),
    case("Shot", [["assets", "in", [L("Asset", 1), *pad_links("Asset")]]]),
    case("Shot", [["assets", "in", [L("Asset", 2), None, *pad_links("Asset")]]]),
    case("Shot", [["assets", "not_in", [L("Asset", 1), *pad_links("Asset")]]]),
    case("Note", [["note_links", "in", [L("Shot", 1), L("Version", 1), *pad_links("Shot", "Version", "Asset")]]]),
    case("Shot", [["sg_sequence.Sequence.code", "in", ["sq01", *[f"pad{i}" for i in pad_ids()]]]]),
    case("Shot", [["assets.Asset.code", "not_in", ["PROP_SS", *[f"pad{i}" for i in pad_ids()]]]]),
]


@pytest.mark.parametrize(("entity_type", "filters", "fields", "kw", "hit"),
                         SCALARS + ENTITIES + DEEP + GROUPS + RETURNS + SORTS + LONG)
def test_proxy_answers_as_sg(rig: Rig, clients: Any, entity_type: str, filters: Any, fields: list[str] | None,
                             kw: dict[str, Any], hit: bool) -> None:
    sg, direct = clients
    expected = run(direct, entity_type, filters, fields, dict(kw))
    before = rig.reads()
    got = run(sg, entity_type, filters, fields, dict(kw))
    assert got == expected
    if hit:
        assert rig.reads() == before, "the fake SG saw the read: it was not a hit"
    else:
        assert rig.reads() > before, "a read listed as passed was answered by the cache: update the list"


def test_every_case_saw_data(clients: Any) -> None:
    """The data covers what the cases ask for: no field of Shot is None everywhere."""
    _sg, direct = clients
    rows = direct.find("Shot", [], all_fields("Shot"))
    for f in all_fields("Shot"):
        assert any(r[f] not in (None, [], False) for r in rows), f


# ---------------------------------------------------------------------------------- paging, names
N_SHOTS = 1001


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    project = site.create_direct("Project", {"name": "Big"})
    seqs = [site.create_direct("Sequence", {"code": f"SQ{i}", "project": L("Project", project["id"])})
            for i in range(3)]
    for i in range(N_SHOTS):
        site.create_direct("Shot", {"code": f"sh{(i * 7919) % N_SHOTS:04d}", "sg_cut_in": i % 13 or None,
                                    "sg_sequence": L("Sequence", seqs[i % 3]["id"]) if i % 4 else None,
                                    "project": L("Project", project["id"])}, events=False)
    # a second database for this rig: the oracle's replica must not see these rows
    with fresh_db_url(tmp_path_factory.mktemp("bigdb")) as url:
        yield from make_rig(tmp_path_factory.mktemp("big"), url, site)


@pytest.mark.parametrize("version", [(8, 50, 0), (7, 0, 0)], ids=["has_next_page", "entity_count"])
@pytest.mark.parametrize("page_size", [500, 7])
def test_paging_over_1001_rows(big: Rig, version: tuple[int, int, int], page_size: int) -> None:
    site = big.site
    old = site.version, site.page_size
    site.version, site.page_size = version, page_size
    try:
        sg, direct = big.client(), big.direct()
        sg.find_one("Project", [])
        order = [{"field_name": "sg_cut_in", "direction": "desc"}, {"field_name": "code", "direction": "asc"}]
        calls = [
            dict(filters=[], fields=["code", "sg_sequence"]),
            dict(filters=[["sg_cut_in", "is_not", None]], fields=["code", "sg_cut_in"], order=order),
            dict(filters=[], fields=["code"], limit=N_SHOTS - 1),
            dict(filters=[], fields=["code"], limit=page_size, page=3),
            dict(filters=[], fields=["code"], limit=page_size + 1),
            dict(filters=[["sg_sequence.Sequence.code", "is", "SQ1"]], fields=["code"], order=order[1:]),
        ]
        for kwargs in calls:
            expected = direct.find("Shot", **kwargs)
            before = big.reads()
            got = sg.find("Shot", **kwargs)
            assert got == expected, kwargs
            assert big.reads() == before, kwargs
        assert len(sg.find("Shot", [], ["id"])) == N_SHOTS
    finally:
        site.version, site.page_size = old


def test_names_follow_the_linked_identifier(big: Rig) -> None:
    sg, direct = big.client(), big.direct()
    sg.find_one("Project", [])
    seq = sg.find_one("Sequence", [["code", "is", "SQ2"]], ["code"])
    sg.update("Sequence", seq["id"], {"code": "Renamed ü"})  # through the proxy: it learns the write
    cases = [
        ([["sg_sequence", "is", {"type": "Sequence", "id": seq["id"]}]], ["sg_sequence", "sg_sequence.Sequence.code"]),
        ([["sg_sequence", "name_is", "RENAMED Ü"]], ["code"]),
        ([["sg_sequence", "name_contains", "SQ2"]], ["code"]),
        ([["id", "less_than", 40]], ["sg_sequence"]),
    ]
    for filters, fields in cases:
        expected = direct.find("Shot", filters, fields)
        before = big.reads()
        assert sg.find("Shot", filters, fields) == expected, filters
        assert big.reads() == before, filters
    assert sg.find("Shot", [["sg_sequence", "name_contains", "renamed"]], ["id"])
    assert sg.find("Project", [], ["name", "users"]) == direct.find("Project", [], ["name", "users"])
