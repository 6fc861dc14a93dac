"""Production behaviours end to end: read-your-writes, verified credentials, SG outages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from .rig import KEY, RIG_OPTIONS, SCRIPT, Rig
from .wait import wait_until

OPTIONS = RIG_OPTIONS


@pytest.fixture
def rig(tmp_path: Path, db_url: str, request: pytest.FixtureRequest) -> Iterator[Rig]:
    with Rig(tmp_path, db_url, proxy=OPTIONS + getattr(request, "param", [])) as rig:
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


@pytest.mark.parametrize("rig", [["sgcache_auth_ttl=1"]], indirect=True)
def test_credentials_are_verified_by_sg(rig: Rig) -> None:
    bad = rig.client(api_key="wrong")
    for _ in range(3):
        with pytest.raises(shotgun_api3.AuthenticationFault):
            bad.find("Shot", [], ["code"])
    good = rig.client()
    before = rig.reads()
    good.find("Shot", [], ["code"])
    assert rig.reads() == before + 1, "the first request with new credentials must go to SG"
    hit(rig, good, "Shot", [], ["code"])
    rig.site.revoke_script(SCRIPT)
    # the proxy keeps SG's verdict on the key for sgcache_auth_ttl (1 s), then asks SG again
    wait_until(lambda: refused(good), 10, "the revoked key to be refused")
    with pytest.raises(shotgun_api3.AuthenticationFault):
        good.find("Shot", [], ["code"])
    with pytest.raises(shotgun_api3.AuthenticationFault):
        good.find("Shot", [], ["code"])


def refused(sg: Any) -> bool:
    """True if SG refuses the client's credentials on a read (False: the read was answered)."""
    try:
        sg.find("Shot", [], ["code"])
    except shotgun_api3.AuthenticationFault:
        return True
    return False


def test_sg_down_reads_served_stale_writes_refused(rig: Rig) -> None:
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
        fresh = shotgun_api3.Shotgun(rig.server.url, script_name=SCRIPT, api_key=KEY, http_proxy=rig.proxy.address)
        assert fresh.info()["sgcache"]["offline"] is True
    finally:
        rig.server.start()
    assert rig.direct().find("Shot", [["code", "is", "offline"]]) == []


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
