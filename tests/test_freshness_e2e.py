"""Freshness end to end: a change at the fake SG shows through the proxy, as a cache hit, within seconds.

Processes: the fake SG server, scripts/scan --full, scripts/ingest-events (polling every
0.2 s) and mitmdump with the addon; a real shotgun_api3 client reads through the proxy
with its own credentials, so a read the fake SG served is a miss.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from .fakesg import FakeSite
from .rig import Rig

WITHIN = 5.0  # seconds; the ingester polls every 0.2 s


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    proj = site.create_direct("Project", {"name": "Fresh"})
    assets = [site.create_direct("Asset", {"code": f"asset{i}", "project": proj}) for i in range(3)]
    for i in range(4):
        site.create_direct("Shot", {"code": f"sh{i:03d}", "project": proj, "assets": assets[:1]})
    # primed while its Task is retired: SG shows the Version's sg_task as None until the revival
    task = site.create_direct("Task", {"content": "retired-at-prime", "project": proj})
    site.create_direct("Version", {"code": "v-retired-task", "project": proj, "sg_task": task})
    site.delete_direct("Task", task["id"])
    with Rig(tmp_path_factory.mktemp("fresh"), module_db_url, site, ingester=True, poll_interval=0.2,
             ingest_args=("--gap-timeout", "5")) as r:
        yield r


def shot(rig: Rig, code: str) -> dict[str, Any]:
    return rig.site.find_direct("Shot", [["code", "is", code]], ["id"])[0]


def find_shot(rig: Rig, shot_id: int, fields: list[str] | None = None) -> list[dict[str, Any]]:
    return rig.reader.find("Shot", [["id", "is", shot_id]], fields or ["code", "assets"])


def test_update_is_a_hit_within_seconds(rig: Rig) -> None:
    sid = shot(rig, "sh000")["id"]
    rig.site.update_direct("Shot", sid, {"code": "sh000-v2"})
    elapsed, _ = rig.wait_hit(lambda: find_shot(rig, sid), lambda r: r and r[0]["code"] == "sh000-v2")
    assert elapsed < WITHIN


def test_multi_entity_add_is_a_hit_within_seconds(rig: Rig) -> None:
    sid = shot(rig, "sh001")["id"]
    asset = rig.site.find_direct("Asset", [["code", "is", "asset2"]], ["id"])[0]
    rig.site.update_direct("Shot", sid, {"assets": [{"type": "Asset", "id": asset["id"]}]}, modes={"assets": "add"})
    elapsed, _ = rig.wait_hit(lambda: find_shot(rig, sid),
                              lambda r: r and asset["id"] in [a["id"] for a in r[0]["assets"]])
    assert elapsed < WITHIN


def test_retirement_then_revival_are_hits_within_seconds(rig: Rig) -> None:
    sid = shot(rig, "sh002")["id"]
    rig.site.delete_direct("Shot", sid)
    elapsed, _ = rig.wait_hit(lambda: find_shot(rig, sid), lambda r: r == [])
    assert elapsed < WITHIN
    rig.site.revive_direct("Shot", sid)
    elapsed, _ = rig.wait_hit(lambda: find_shot(rig, sid), lambda r: len(r) == 1 and r[0]["code"] == "sh002")
    assert elapsed < WITHIN


def test_a_link_to_an_entity_retired_at_prime_shows_as_a_hit_after_its_revival(rig: Rig) -> None:
    """The replica was primed while a Version's Task was retired (SG showed ``sg_task`` None, so
    the replica never held the link). The Task's revival at SG: the ingester asks SG which rows
    link it, and the Version's link is a hit within seconds, as SG shows it."""
    version = [("Version", [["code", "is", "v-retired-task"]], ["code", "sg_task"])]
    rig.wait_hit(lambda: rig.reader.find(*version[0]), lambda r: len(r) == 1 and r[0]["sg_task"] is None)
    task = rig.site.find_direct("Task", [["content", "is", "retired-at-prime"]], ["id"], retired_only=True)[0]
    rig.site.revive_direct("Task", task["id"])
    elapsed, _ = rig.wait_hit(lambda: rig.reader.find(*version[0]),
                              lambda r: len(r) == 1 and (r[0]["sg_task"] or {}).get("id") == task["id"])
    assert elapsed < WITHIN
    assert rig.reader.find(*version[0]) == rig.direct().find(*version[0])


def test_create_is_a_hit_within_seconds(rig: Rig) -> None:
    proj = rig.site.find_direct("Project", [], ["id"])[0]
    rig.site.create_direct("Shot", {"code": "brand-new", "project": {"type": "Project", "id": proj["id"]}})
    elapsed, _ = rig.wait_hit(lambda: rig.reader.find("Shot", [["code", "is", "brand-new"]], ["code", "project"]),
                              lambda r: len(r) == 1)
    assert elapsed < WITHIN


def test_change_without_events_is_found_by_scan_since(rig: Rig) -> None:
    sid = shot(rig, "sh003")["id"]
    since = rig.site.now() - dt.timedelta(seconds=5)
    rig.site.events_enabled = False
    try:
        rig.site.update_direct("Shot", sid, {"code": "silent"})
    finally:
        rig.site.events_enabled = True
    # the ingester sees nothing: the proxy keeps answering the old value as a hit
    rig.wait_hit(lambda: find_shot(rig, sid), lambda r: r and r[0]["code"] == "sh003")
    rig.scan("--since", since.strftime("%Y-%m-%dT%H:%M:%SZ"))
    elapsed, _ = rig.wait_hit(lambda: find_shot(rig, sid), lambda r: r and r[0]["code"] == "silent", timeout=2)
    assert elapsed < 2
