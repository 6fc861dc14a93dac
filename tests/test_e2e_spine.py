"""The spine, end to end: shotgun_api3 -> mitmdump + sgcache -> fake SG, on SQLite and PostgreSQL, with the
proxy in regular mode (clients set http_proxy) and in reverse mode (clients name the proxy as their site)."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .paths import RULES
from .rig import KEY, SCRIPT, Rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, mode_db_url: str, proxy_mode: str) -> Iterator[Rig]:
    """One primed replica and proxy for the module and mode; tests that write use their own rows."""
    with Rig(tmp_path_factory.mktemp(f"rig-{proxy_mode}"), mode_db_url, mode=proxy_mode) as rig:
        yield rig


def warm(sg: Any) -> None:
    """The first call with new credentials passes through; SG accepting it enables hits."""
    sg.find_one("Project", [])


FIELDS = ["code", "sg_cut_in", "sg_status_list", "sg_sequence", "project", "assets", "sg_sequence.Sequence.code"]
FILTERS: list[list[Any]] = [
    [["code", "is", "sh010"]],
    [["code", "is", "sh050"]],  # SG matches text case-insensitively
    [["code", "in", ["sh000", "SH020", "nope"]]],
    [["code", "not_in", ["sh000", "sh010"]]],
    [["code", "is_not", "sh000"]],
    [["sg_cut_in", "is", 1004]],
    [["sg_cut_in", "is_not", 1004]],  # keeps the NULL
    [["sg_cut_in", "in", [1001, 1002, None]]],
    [["sg_cut_in", "not_in", [1001]]],
    [["sg_status_list", "is", "ip"], ["sg_cut_in", "is_not", None]],
    [["sg_sequence", "is", {"type": "Sequence", "id": 1}]],
    [["sg_sequence", "is", None]],
    [["sg_sequence", "is_not", {"type": "Sequence", "id": 1}]],
    [["sg_sequence", "in", [{"type": "Sequence", "id": 1}, {"type": "Sequence", "id": 2}]]],
    [["sg_sequence", "not_in", [{"type": "Sequence", "id": 2}]]],
]


@pytest.mark.parametrize("filters", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_find_is_answered_from_the_replica_exactly(rig: Rig, filters: list[Any]) -> None:
    sg = rig.client()
    warm(sg)
    expected = rig.direct().find("Shot", filters, FIELDS)
    before = rig.reads()
    got = sg.find("Shot", filters, FIELDS)
    assert got == expected
    assert rig.reads() == before, "the fake SG saw the read: it was not a hit"


def test_sorted_paged_find_is_a_hit(rig: Rig) -> None:
    sg = rig.client()
    warm(sg)
    order = [{"field_name": "sg_cut_in", "direction": "desc"}]
    expected = rig.direct().find("Shot", [], ["code", "sg_cut_in"], order=order, limit=5, page=2)
    expected_one = rig.direct().find_one("Shot", [["code", "is", "sh100"]], ["code"])
    before = rig.reads()
    assert sg.find("Shot", [], ["code", "sg_cut_in"], order=order, limit=5, page=2) == expected
    assert sg.find_one("Shot", [["code", "is", "sh100"]], ["code"]) == expected_one
    assert rig.reads() == before


def test_create_goes_upstream_and_is_read_back(rig: Rig) -> None:
    sg = rig.client()
    warm(sg)
    creates = rig.site.count("create")
    made = sg.create("Shot", {"code": "zz999", "sg_cut_in": 7, "project": {"type": "Project", "id": 1}},
                     return_fields=[f for f in FIELDS if "." not in f])
    assert rig.site.count("create") == creates + 1
    assert made == rig.direct().find_one("Shot", [["id", "is", made["id"]]], [f for f in FIELDS if "." not in f])
    before = rig.reads()
    assert sg.find("Shot", [["code", "is", "zz999"]], ["code", "sg_cut_in"]) == [
        {"type": "Shot", "id": made["id"], "code": "zz999", "sg_cut_in": 7}]
    assert rig.reads() == before


def test_what_sg_changes_besides_the_fields_sent_reads_back_as_sg_has_it(rig: Rig) -> None:
    """A tool writes through the proxy and reads back at once: SG moves a Task's due date with its
    start date, a person's new first name shows in the name of the links to them, and a renamed
    TaskTemplate (a type the replica does not hold) shows its new name in the Shots linking it; the
    answers to the writes carry none of it."""
    sg = rig.client()
    warm(sg)
    project = {"type": "Project", "id": 1}
    task = sg.create("Task", {"content": "scheduled", "project": project, "start_date": "2026-02-02",
                              "due_date": "2026-02-06"})
    assert sg.update("Task", task["id"], {"start_date": "2026-02-09"}) == {
        "type": "Task", "id": task["id"], "start_date": "2026-02-09"}
    dates = [["id", "is", task["id"]]], ["start_date", "due_date"]
    assert rig.direct().find_one("Task", *dates)["due_date"] == "2026-02-13"
    assert sg.find_one("Task", *dates) == rig.direct().find_one("Task", *dates)

    person = sg.create("HumanUser", {"login": "zz-ann", "firstname": "Ann", "lastname": "Lee"})
    assigned = sg.create("Task", {"content": "assigned", "project": project,
                                  "task_assignees": [{"type": "HumanUser", "id": person["id"]}]})
    assignees = [["id", "is", assigned["id"]]], ["task_assignees"]
    reads = rig.reads()
    assert sg.find_one("Task", *assignees)["task_assignees"][0]["name"] == "Ann Lee"
    assert rig.reads() == reads  # a hit: the replica has them
    sg.update("HumanUser", person["id"], {"firstname": "Anna"})  # SG composes the name shown
    assert rig.direct().find_one("Task", *assignees)["task_assignees"][0]["name"] == "Anna Lee"
    assert sg.find_one("Task", *assignees) == rig.direct().find_one("Task", *assignees)

    template = rig.site.add_task_template(900, "tpl-old", [])
    shot = sg.create("Shot", {"code": "zz-tpl", "project": project, "task_template": template})
    linked = [["id", "is", shot["id"]]], ["task_template"]
    assert sg.find_one("Shot", *linked)["task_template"]["name"] == "tpl-old"
    sg.update("TaskTemplate", 900, {"code": "tpl-new"})
    assert sg.find_one("Shot", *linked) == rig.direct().find_one("Shot", *linked)
    assert rig.direct().find_one("Shot", *linked)["task_template"]["name"] == "tpl-new"


@pytest.mark.parametrize(
    ("filters", "fields"),
    [
        ([["code", "is", "sh010"]], ["code", "image"]),  # a field the cache does not hold
        ([["created_at", "in_last", 7, "DAY"]], ["code"]),  # an operator the engine passes on
        ([["code", "is", "sh010"]], ["code", "sg_no_such_field_anywhere"]),
    ],
)
def test_uncacheable_reads_pass_and_stay_correct(rig: Rig, filters: list[Any], fields: list[str]) -> None:
    sg = rig.client()
    warm(sg)
    before = rig.reads()
    try:
        expected: Any = rig.direct().find("Shot", filters, fields)
    except Exception as exc:  # noqa: BLE001 - SG's own error must come through unchanged
        expected = type(exc), str(exc)
    mid = rig.reads()
    try:
        got: Any = sg.find("Shot", filters, fields)
    except Exception as exc:  # noqa: BLE001
        got = type(exc), str(exc)
    assert got == expected
    assert rig.reads() == mid + (mid - before), "the read was not passed upstream"


def test_wrong_key_is_never_served(rig: Rig) -> None:
    import shotgun_api3

    bad = rig.client(api_key="wrong")
    for _ in range(3):
        with pytest.raises(shotgun_api3.AuthenticationFault):
            bad.find("Shot", [], ["code"])


def test_answers_carry_the_header_and_info_the_counters(rig: Rig) -> None:
    warm(rig.client())
    auth = {"script_name": SCRIPT, "script_key": KEY}

    def read(fields: list[str]) -> tuple[str, Any]:
        args = {"type": "Shot", "return_fields": fields, "return_only": "active",
                "filters": {"logical_operator": "and",
                            "conditions": [{"path": "code", "relation": "is", "values": ["sh010"]}]},
                "paging": {"entities_per_page": 500, "current_page": 1}}
        body = json.dumps({"method_name": "read", "params": [auth, args]}).encode()
        _status, headers, reply = _through_proxy(rig, "POST", "/api3/json", body)
        return headers.get("X-SGCache", ""), json.loads(reply)["results"]["entities"]

    expected = rig.direct().find("Shot", [["code", "is", "sh010"]], ["code", "image"])
    before = rig.reads()
    assert read(["code"]) == ("hit", [{k: v for k, v in e.items() if k != "image"} for e in expected])
    assert rig.reads() == before
    header, got = read(["code", "image"])  # a field the cache does not hold
    assert header.startswith("pass; reason=") and got == expected
    assert rig.reads() == before + 1
    extra = rig.client().info()["sgcache"]
    assert extra["hits"] >= 1 and extra["passes"][header.split("reason=", 1)[1]] >= 1


def _through_proxy(rig: Rig, method: str, path: str, body: bytes | None) -> tuple[int, Any, bytes]:
    """A plain request through the proxy: to the site with the proxy set, or to the reverse proxy itself."""
    assert rig.proxy is not None
    proxies = {} if rig.proxy.reverse else {"http": f"http://{rig.proxy.address}"}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    req = urllib.request.Request(rig.proxy_url() + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    with opener.open(req, timeout=10) as resp:
        return resp.status, resp.headers, resp.read()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api3/json", b"{this is not json"),
        ("POST", "/api3/json", b'{"method_name": "read", "params": "nope"}'),
        ("POST", "/upload/upload_file", b"binary\x00\xffpayload"),
        ("GET", "/file_serve/attachment/12", None),
    ],
)
def test_other_requests_reach_sg_unchanged(rig: Rig, method: str, path: str, body: bytes | None) -> None:
    """Bodies that are not API3, uploads and downloads go to SG as they came, in either mode."""
    before = len(rig.site.raw_requests)
    _through_proxy(rig, method, path, body)
    seen = rig.site.raw_requests[before:]
    assert [(m, p, b) for m, p, _h, b in seen] == [(method, path, body or b"")]
    assert hashlib.sha256(seen[0][3]).hexdigest() == hashlib.sha256(body or b"").hexdigest()


def test_stale_replica_passes(tmp_path: Path, db_url: str) -> None:
    """Without an ingester heartbeat, sgcache_max_lag makes every read pass (and stay correct)."""
    with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=60"]) as rig:
        sg = rig.client()
        warm(sg)
        before = rig.reads()
        assert sg.find("Shot", [["code", "is", "sh010"]], ["code"]) == rig.direct().find(
            "Shot", [["code", "is", "sh010"]], ["code"])
        assert rig.reads() == before + 2


def test_schema_dump_then_filter_gives_a_schema_the_proxy_runs_with(tmp_path: Path, db_url: str) -> None:
    with Rig(tmp_path, db_url, prime=None, proxy=False) as rig:
        rig.schema_path = tmp_path / "subset.yml"
        dumped = tmp_path / "site.yml"
        rig.run("schema-dump", "-o", str(dumped))
        subset = rig.run("schema-filter", "--rules", str(RULES), str(dumped)).stdout
        rig.schema_path.write_text(subset)
        rig.scan("--full")
        rig.start_proxy(["sgcache_max_lag=0"])
        sg = rig.client()
        warm(sg)
        expected = rig.direct().find("Shot", [["code", "is", "sh010"]], ["code", "sg_sequence"])
        before = rig.reads()
        assert sg.find("Shot", [["code", "is", "sh010"]], ["code", "sg_sequence"]) == expected
        assert rig.reads() == before
