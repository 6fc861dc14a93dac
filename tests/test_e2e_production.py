"""Production behaviours end to end: read-your-writes, verified credentials, writes sent once, SG outages;
with the proxy in regular and in reverse mode.

One rig per mode serves the first three, in this order (the lost answer of the last leaves pending-write
marks on Shot); the outage test takes the site down, so it has a rig of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from .fakesg import FakeSite
from .rig import KEY, RIG_OPTIONS, SCRIPT, Rig, populate
from .wait import wait_until

OPTIONS = RIG_OPTIONS


#: A script the credentials test revokes (the others keep using SCRIPT).
REVOCABLE, REVOCABLE_KEY = "revocable", "rev0cable"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, mode_db_url: str, proxy_mode: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    site.add_script(REVOCABLE, REVOCABLE_KEY)
    populate(site)
    with Rig(tmp_path_factory.mktemp(f"prod-{proxy_mode}"), mode_db_url, site, proxy=OPTIONS, mode=proxy_mode) as rig:
        yield rig


def hit(rig: Rig, sg: Any, *args: Any, **kwargs: Any) -> Any:
    """find() through the proxy, asserting the fake SG saw no read for it."""
    before = rig.reads()
    result = sg.find(*args, **kwargs)
    assert rig.reads() == before, "not answered from the cache"
    return result


def test_reads_your_own_writes_without_the_ingester(rig: Rig) -> None:
    sg = rig.client()
    sg.find_one("Project", [])
    asset = {"type": "Asset", "id": 1}
    shot = sg.create("Shot", {"code": "new01", "project": {"type": "Project", "id": 1}})
    sid = shot["id"]
    assert [s["id"] for s in hit(rig, sg, "Shot", [["code", "is", "new01"]])] == [sid]

    sg.update("Shot", sid, {"code": "new01b", "assets": [asset]})
    got = hit(rig, sg, "Shot", [["id", "is", sid]], ["code", "assets"])
    assert got == rig.direct().find("Shot", [["id", "is", sid]], ["code", "assets"])
    assert got[0]["code"] == "new01b" and [a["id"] for a in got[0]["assets"]] == [1]

    sg.update("Shot", sid, {"assets": [{"type": "Asset", "id": 2}]}, multi_entity_update_modes={"assets": "add"})
    got = hit(rig, sg, "Shot", [["id", "is", sid]], ["assets"])
    assert got == rig.direct().find("Shot", [["id", "is", sid]], ["assets"])

    assert sg.delete("Shot", sid) is True
    assert hit(rig, sg, "Shot", [["id", "is", sid]]) == []
    assert [s["id"] for s in hit(rig, sg, "Shot", [["id", "is", sid]], retired_only=True)] == [sid]
    assert sg.revive("Shot", sid) is True
    assert [s["id"] for s in hit(rig, sg, "Shot", [["id", "is", sid]])] == [sid]

    results = sg.batch([
        {"request_type": "create", "entity_type": "Shot", "data": {"code": "b1", "project": {"type": "Project", "id": 1}}},
        {"request_type": "update", "entity_type": "Shot", "entity_id": sid, "data": {"code": "b2"}},
        {"request_type": "delete", "entity_type": "Shot", "entity_id": 1},
    ])
    fields = ["code", "assets", "project"]
    assert hit(rig, sg, "Shot", [], fields) == rig.direct().find("Shot", [], fields)
    assert results[2] is True


def test_credentials_are_verified_by_sg(rig: Rig, tmp_path: Path) -> None:
    proxy = rig.start_proxy(OPTIONS + ["sgcache_auth_ttl=1"], workdir=tmp_path)
    bad = rig.client(proxy, script_name=REVOCABLE, api_key="wrong")
    for _ in range(3):
        with pytest.raises(shotgun_api3.AuthenticationFault):
            bad.find("Shot", [], ["code"])
    good = rig.client(proxy, script_name=REVOCABLE, api_key=REVOCABLE_KEY)
    before = rig.reads()
    good.find("Shot", [], ["code"])
    assert rig.reads() == before + 1, "the first request with new credentials must go to SG"
    hit(rig, good, "Shot", [], ["code"])
    rig.site.revoke_script(REVOCABLE)
    # the proxy keeps SG's verdict on the key for sgcache_auth_ttl (1 s), then asks SG again
    wait_until(lambda: refused(good), 10, "the revoked key to be refused")
    with pytest.raises(shotgun_api3.AuthenticationFault):
        good.find("Shot", [], ["code"])
    with pytest.raises(shotgun_api3.AuthenticationFault):
        good.find("Shot", [], ["code"])
    proxy.stop()


def refused(sg: Any) -> bool:
    """True if SG refuses the client's credentials on a read (False: the read was answered)."""
    try:
        sg.find("Shot", [], ["code"])
    except shotgun_api3.AuthenticationFault:
        return True
    return False


def test_a_write_is_never_sent_twice(rig: Rig) -> None:
    """SG applies a create but its answer is lost: the client gets an error saying so, and SG
    saw the create once (relayed as mitmproxy's 502, shotgun_api3 would have re-sent it)."""
    sg = rig.client()
    sg.find_one("Project", [])
    creates = rig.site.count("create")
    rig.server.drop_next_answers(1)
    with pytest.raises(shotgun_api3.Fault, match="may have been applied"):
        sg.create("Shot", {"code": "once", "project": {"type": "Project", "id": 1}})
    assert rig.site.count("create") == creates + 1
    assert len(rig.direct().find("Shot", [["code", "is", "once"]])) == 1
    # the next write goes through normally
    made = sg.create("Shot", {"code": "twice", "project": {"type": "Project", "id": 1}})
    assert rig.direct().find_one("Shot", [["id", "is", made["id"]]], ["code"])["code"] == "twice"


def test_sg_down_reads_served_stale_writes_refused(tmp_path: Path, db_url: str, proxy_mode: str) -> None:
    with Rig(tmp_path, db_url, proxy=OPTIONS, mode=proxy_mode) as rig:
        sg_down_reads_served_stale_writes_refused(rig)


def sg_down_reads_served_stale_writes_refused(rig: Rig) -> None:
    sg = rig.client()
    sg.find_one("Project", [])
    expected = sg.find("Shot", [["code", "is", "sh010"]], ["code"])
    rig.server.stop_listening()
    try:
        # shotgun_api3 re-sends a read that got a 502; the retry is served from the replica
        assert sg.find("Shot", [["code", "is", "sh010"]], ["code"]) == expected
        assert sg.find("Shot", [["code", "is", "sh010"]], ["code"]) == expected
        with pytest.raises(shotgun_api3.Fault, match="cannot be reached"):
            sg.create("Shot", {"code": "offline"})
        fresh = rig.client()
        assert fresh.info()["sgcache"]["offline"] is True
    finally:
        rig.server.start()
    assert rig.direct().find("Shot", [["code", "is", "offline"]]) == []
