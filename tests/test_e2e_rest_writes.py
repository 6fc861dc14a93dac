"""Writes through SG's REST API (a fake SG serving a little of it, mitmdump, a real shotgun_api3
client reading back through API3): SG's answer to a REST write marks every cached type pending
before the tool has it, so the tool reads its write back right; a field a REST schema edit deletes
is un-primed, so once the ingester is past the write SG answers its reads, not the replica.
Refused REST writes, REST reads and the token exchange mark nothing."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from .rig import KEY, SCRIPT, Rig


def rest(rig: Rig, method: str, route: str, body: Any = None, token: str | None = None,
         form: dict[str, str] | None = None) -> tuple[int, Any]:
    """A REST API call to the site through the proxy: (status, decoded answer or None)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{rig.proxy.address}"}))
    headers = {"Accept": "application/json"}
    data = None
    if form is not None:
        data, headers["Content-Type"] = urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(rig.server.url + route, data=data, method=method, headers=headers)
    try:
        with opener.open(request, timeout=60) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def token(rig: Rig) -> str:
    status, answer = rest(rig, "POST", "/api/v1/auth/access_token",
                          form={"grant_type": "client_credentials", "client_id": SCRIPT, "client_secret": KEY})
    assert status == 200, answer
    return answer["access_token"]


def a_hit(rig: Rig, read: Any) -> Any:
    """``read()``'s answer, asserting SG served no read for it."""
    before = rig.reads()
    value = read()
    assert rig.reads() == before, "not a hit"
    return value


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_a_rest_write_is_read_back_right(tmp_path: Path, db_url: str, method: str) -> None:
    """Before: the REST call passed untouched and unmarked, SG applied it, and the tool's API3 read
    back was the replica's old row, a hit, until the ingester caught up."""
    with Rig(tmp_path, db_url) as rig:
        sg = rig.client()
        shot = sg.find_one("Shot", [["code", "is", "sh010"]], ["code"])
        read = lambda: sg.find_one("Shot", [["id", "is", shot["id"]]], ["code"])  # noqa: E731
        assert a_hit(rig, read)["code"] == "sh010"
        body = {"code": "renamed"} if method != "DELETE" else None
        status, answer = rest(rig, method, f"/api/v1/entity/Shot/{shot['id']}", body, token(rig))
        assert status == (204 if method == "DELETE" else 200), answer
        assert read() == (None if method == "DELETE" else {"type": "Shot", "id": shot["id"], "code": "renamed"}), \
            "the tool read its REST write back stale"


def test_refused_rest_writes_and_rest_reads_mark_nothing(tmp_path: Path, db_url: str) -> None:
    """A REST write SG refuses (no token, a bad one, an unknown field), a search, a GET and the token
    exchange change nothing: every client's reads stay hits."""
    with Rig(tmp_path, db_url) as rig:
        sg = rig.client()
        query = ("Shot", [["code", "is", "sh010"]], ["code"])
        shot = sg.find_one(*query)
        a_hit(rig, lambda: sg.find_one(*query))
        good = token(rig)
        route = f"/api/v1/entity/Shot/{shot['id']}"
        assert rest(rig, "PUT", route, {"code": "nope"})[0] == 401
        assert rest(rig, "PUT", route, {"code": "nope"}, "forged")[0] == 401
        assert rest(rig, "PUT", route, {"no_such_field": 1}, good)[0] == 400
        assert rest(rig, "DELETE", "/api/v1/entity/Shot/999999", None, good)[0] == 400
        status, found = rest(rig, "POST", "/api/v1/entity/Shot/_search",
                             {"filters": [["code", "is", "sh010"]], "fields": ["code"]}, good)
        assert status == 200 and [r["id"] for r in found["data"]] == [shot["id"]]
        assert rest(rig, "GET", route, None, good)[1]["data"]["attributes"]["code"] == "sh010"
        assert a_hit(rig, lambda: sg.find_one(*query))["code"] == "sh010", "a REST call that changed nothing marked"


def test_a_field_a_rest_schema_edit_deletes_is_not_served_after_the_ingester_passes(
        tmp_path: Path, db_url: str) -> None:
    """SG logs no event for a schema edit: before, the write's markers (had there been any) cleared
    with the ingester's next poll and the replica went on serving the deleted field's old values.
    Now the field is un-primed: SG answers its reads (an error: the field is gone)."""
    with Rig(tmp_path, db_url, ingester=True, poll_interval=0.2) as rig:
        sg = rig.client()
        shot = sg.find_one("Shot", [["code", "is", "sh010"]], ["sg_cut_in"])
        rig.wait_hit(lambda: sg.find_one("Shot", [["id", "is", shot["id"]]], ["sg_cut_in"]),
                     lambda row: row["sg_cut_in"] == shot["sg_cut_in"], script=SCRIPT)
        status, answer = rest(rig, "DELETE", "/api/v1/schema/Shot/fields/sg_cut_in", None, token(rig))
        assert status == 204, answer
        sg.update("Shot", shot["id"], {"code": "after"})  # an event: the ingester's next poll passes the write
        rig.wait_hit(lambda: sg.find_one("Shot", [["id", "is", shot["id"]]], ["code"]),
                     lambda row: row["code"] == "after", timeout=30, script=SCRIPT)
        with pytest.raises(shotgun_api3.Fault, match="sg_cut_in"):
            sg.find_one("Shot", [["id", "is", shot["id"]]], ["sg_cut_in"])
