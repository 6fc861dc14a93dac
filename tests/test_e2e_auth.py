"""Nobody reads what SG would not let them read: credentials SG accepted, at that site, only.

A real shotgun_api3 client and raw API3 POSTs through a real mitmdump to the fake SG.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import shotgun_api3

from .fakesg import FakeSGServer, FakeSite
from .proxyharness import _raw_exchange
from .rig import HUMAN, HUMAN_PASSWORD, KEY, RIG_OPTIONS, SCRIPT, Rig, populate_with_human

READ_USERS = {"type": "HumanUser", "return_fields": ["login"],
              "filters": {"logical_operator": "and", "conditions": []},
              "paging": {"entities_per_page": 500, "current_page": 1}, "return_only": "active"}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    """Every script SG accepts may be served, and human users too; a human exists at the fake SG."""
    with Rig(tmp_path_factory.mktemp("rig"), module_db_url, populate_site=populate_with_human,
             proxy=RIG_OPTIONS + ["sgcache_allow_users=true",
                                  # the second fake site of test_a_credential_accepted_at_one_site... is on loopback
                                  "sgcache_allow_connect=127.0.0.1:*"]) as rig:
        yield rig


@pytest.fixture(scope="module")
def listed(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The same site and replica behind a second proxy that serves only the script ``SCRIPT``."""
    options = RIG_OPTIONS + [f"sgcache_scripts={SCRIPT}"]
    proxy = rig.start_proxy(options, workdir=tmp_path_factory.mktemp("listed"))
    try:
        yield rig.through(proxy)
    finally:
        proxy.stop()


def post(rig: Rig, method: str, auth: Any, args: Any = None, url: str | None = None) -> tuple[str, Any]:
    """One API3 POST through the proxy: (X-SGCache header, decoded reply)."""
    params = [auth] if args is None else [auth, args]
    body = json.dumps({"method_name": method, "params": params}).encode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{rig.proxy.address}"}))
    req = urllib.request.Request((url or rig.server.url) + "/api3/json", data=body, method="POST",
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    with opener.open(req, timeout=30) as resp:
        return resp.headers.get("X-SGCache", ""), json.loads(resp.read())


@pytest.mark.parametrize(
    "auth",
    [
        {"script_name": "eve", "script_key": "guess"},  # an unknown script
        {"script_name": SCRIPT, "script_key": "guess"},  # a listed script, a wrong key
        {"user_login": HUMAN, "user_password": "guess"},  # a real login, a wrong password
        {"session_token": "made-up-token"},
    ],
    ids=["unknown-script", "listed-script-wrong-key", "wrong-password", "made-up-session"],
)
def test_info_then_read_with_bad_credentials_never_hits(rig: Rig, auth: dict[str, str]) -> None:
    _info_then_read(rig, auth)


def test_info_then_read_with_a_wrong_key_of_a_listed_script_never_hits(listed: Rig) -> None:
    _info_then_read(listed, {"script_name": SCRIPT, "script_key": "guess"})


def _info_then_read(rig: Rig, auth: dict[str, str]) -> None:
    header, reply = post(rig, "info", auth)
    assert "version" in reply and header.startswith("pass")
    for _ in range(2):
        before = rig.reads()
        header, reply = post(rig, "read", auth, READ_USERS)
        assert header == "pass; reason=auth-unverified"
        assert reply["exception"] is True and reply["error_code"] == 102  # SG's own refusal
        assert rig.reads() == before + 1


@pytest.mark.parametrize("proxied", ["rig", "listed"])
def test_a_client_with_a_wrong_key_gets_sgs_authentication_fault(proxied: str, request: pytest.FixtureRequest) -> None:
    rig: Rig = request.getfixturevalue(proxied)
    good = rig.client()
    good.find_one("HumanUser", [])  # SG accepts the right key: its reads become hits
    before = rig.reads()
    good.find("HumanUser", [], ["login"])
    assert rig.reads() == before
    bad = rig.client(api_key="guess")  # connects with info first, as shotgun_api3 does
    bad.info()
    for _ in range(2):
        with pytest.raises(shotgun_api3.AuthenticationFault):
            bad.find("HumanUser", [], ["login"])
    assert rig.reads() == before + 2
    stranger = rig.client(script_name="eve", api_key="guess")
    stranger.info()
    with pytest.raises(shotgun_api3.AuthenticationFault):
        stranger.find("HumanUser", [], ["login"])


def test_a_human_login_is_verified_only_by_sgs_answer(rig: Rig) -> None:
    auth = {"user_login": HUMAN, "user_password": HUMAN_PASSWORD}
    header, reply = post(rig, "read", auth, READ_USERS)
    assert header == "pass; reason=auth-unverified" and "results" in reply
    before = rig.reads()
    header, again = post(rig, "read", auth, READ_USERS)
    assert header == "hit" and again == reply and rig.reads() == before


def test_a_credential_accepted_at_one_site_is_not_verified_at_another(rig: Rig) -> None:
    auth = {"script_name": SCRIPT, "script_key": KEY}
    post(rig, "read", auth, READ_USERS)
    header, _ = post(rig, "read", auth, READ_USERS)
    assert header == "hit"
    with FakeSGServer(rig.site) as second:  # the same fake SG on another port: another site
        assert second.url != rig.server.url
        before = rig.reads()
        header, reply = post(rig, "read", auth, READ_USERS, url=second.url)
        # one site per replica: another site's requests pass as other-site before any auth check
        assert header == "pass; reason=other-site" and "results" in reply
        assert rig.reads() == before + 1
    header, _ = post(rig, "read", auth, READ_USERS)
    assert header == "hit"


def test_a_request_naming_no_host_is_not_the_sites(rig: Rig) -> None:
    """An HTTP/1.0 request in absolute form without a Host header reaches SG without one (mitmproxy
    sends it in origin form): SG's front end routes it to whichever site it takes by default, maybe
    another one. Taken for the site's, what that other site accepted would be credited to the site,
    and the site's replica served to credentials the site refuses."""
    intruder = {"script_name": "intruder", "script_key": "ik-staging-only"}
    staging = FakeSite.basic()
    staging.add_script(intruder["script_name"], intruder["script_key"])
    rig.server.route_hostless_to(staging)  # the front end's default virtual host: another site
    try:
        body = json.dumps({"method_name": "read", "params": [intruder, READ_USERS]}).encode()
        status, raw = _raw_exchange(rig.proxy, (
            f"POST {rig.server.url}/api3/json HTTP/1.0\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body, 30.0)
        assert status == 200 and b'"results"' in raw  # the other site accepted it
        assert b"X-SGCache: pass; reason=other-site" in raw
    finally:
        rig.server.route_hostless_to(None)
    header, reply = post(rig, "read", intruder, READ_USERS)  # named for the site: the site refuses it
    assert header.startswith("pass") and reply["exception"] is True and reply["error_code"] == 102


@pytest.mark.parametrize(
    "auth",
    [
        {"script_name": [SCRIPT], "script_key": KEY},
        {"script_name": {"name": SCRIPT}, "script_key": KEY},
        {"script_name": SCRIPT, "script_key": [KEY]},
        {"script_name": SCRIPT, "script_key": KEY * 1000},
    ],
    ids=["list-name", "dict-name", "list-key", "huge-key"],
)
def test_odd_script_names_get_sgs_answer_with_a_pass(listed: Rig, auth: dict[str, Any]) -> None:
    before = listed.reads()
    header, reply = post(listed, "read", auth, READ_USERS)
    assert header == "pass; reason=bad-auth"
    assert reply["exception"] is True and reply["error_code"] == 102  # what SG says to such a body
    assert listed.reads() == before + 1
    assert "Addon error" not in listed.proxy.output() and "Traceback" not in listed.proxy.output()


def test_a_kept_answer_goes_only_to_verified_credentials_and_never_outlives_a_write(rig: Rig) -> None:
    """The answers kept by exact request (cache/proxy/answercache.py) are still served only to
    credentials SG accepted: a forged key sending the very body of a kept answer gets SG's refusal;
    and a write through the proxy ends the kept answer at once (the writer reads its write)."""
    good = {"script_name": SCRIPT, "script_key": KEY}
    shots = {"type": "Shot", "return_fields": ["code"],
             "filters": {"logical_operator": "and", "conditions": []},
             "sorts": [{"field_name": "id", "direction": "asc"}],
             "paging": {"entities_per_page": 500, "current_page": 1}, "return_only": "active"}
    post(rig, "info", good)
    post(rig, "read", good, shots)  # SG verifies the credentials (a pass), then hits
    headers = [post(rig, "read", good, shots)[0] for _ in range(4)]
    assert headers == ["hit"] * 4, headers  # seen fast, then kept: answered on the event loop
    first = post(rig, "read", good, shots)[1]["results"]["entities"][0]
    for forged in ({"script_name": SCRIPT, "script_key": "guess"}, {"script_name": "eve", "script_key": KEY}):
        before = rig.reads()
        header, reply = post(rig, "read", forged, shots)
        assert header == "pass; reason=auth-unverified" and reply["error_code"] == 102, (header, reply)
        assert rig.reads() == before + 1
    renamed = f"{first['code']}-renamed"
    post(rig, "update", good, {"type": "Shot", "id": first["id"], "fields": [{"field_name": "code", "value": renamed}]})
    header, reply = post(rig, "read", good, shots)
    assert reply["results"]["entities"][0]["code"] == renamed, (header, reply["results"]["entities"][0])


def test_a_lone_surrogate_in_the_auth_passes_and_a_write_with_it_is_sent_once(rig: Rig) -> None:
    """JSON may spell a lone surrogate (``"\\ud800"``), which no UTF-8 holds: such a credential is
    never served (SG decides), and a write with it is sent to SG once and read back as SG has it
    (the credential's hash failed after the proxy had sent the write, and mitmproxy sent it again)."""
    odd = {"script_name": SCRIPT, "script_key": KEY, "x_tag": "\ud800"}  # json.dumps escapes it
    header, reply = post(rig, "read", odd, READ_USERS)
    assert header == "pass; reason=bad-auth" and "results" in reply, (header, reply)
    before = rig.site.count("create", type="Shot")
    args = {"type": "Shot", "fields": [{"field_name": "code", "value": "lone-surrogate"}], "return_fields": ["id"]}
    header, reply = post(rig, "create", odd, args)
    assert rig.site.count("create", type="Shot") - before == 1, (header, reply)
    assert header == "pass; reason=method" and reply["results"]["type"] == "Shot"
    good = {"script_name": SCRIPT, "script_key": KEY}
    shots = {"type": "Shot", "return_fields": ["code"],
             "filters": {"logical_operator": "and",
                         "conditions": [{"path": "code", "relation": "is", "values": ["lone-surrogate"]}]},
             "paging": {"entities_per_page": 500, "current_page": 1}, "return_only": "active"}
    post(rig, "info", good)
    post(rig, "read", good, shots)  # verified
    header, reply = post(rig, "read", good, shots)
    assert [e["id"] for e in reply["results"]["entities"]] == [reply_id(rig, "lone-surrogate")], header
    output = rig.proxy.output()
    assert "Addon error" not in output and "Traceback" not in output


def reply_id(rig: Rig, code: str) -> int:
    """The id of the one Shot with ``code`` at SG, read directly."""
    found = rig.direct().find("Shot", [["code", "is", code]])
    assert len(found) == 1, found
    return int(found[0]["id"])


def test_a_key_sg_refuses_to_the_audits_shadow_read_is_refused_from_then_on(
        rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The audit reads a sampled hit again from SG with the client's credentials: when SG refuses
    them (the key was revoked since it was verified), the proxy stops serving that key at once,
    as when SG refuses it a client's own pass (before: hits until sgcache_auth_ttl, 300 s)."""
    import time

    from .wait import wait_until

    rig.site.add_script("auditee", "auditee-key", generate_events=False)
    proxy = rig.start_proxy(RIG_OPTIONS + ["sgcache_audit=100", "sgcache_audit_rate=0", "sgcache_access_log=json"],
                            workdir=tmp_path_factory.mktemp("audited"))

    def hits() -> int:  # the access log's hits (SG's read count would include the hit's shadow read)
        return proxy.output().count('"entity_type":"Sequence","outcome":"hit"')

    try:
        sg = rig.client(proxy, script_name="auditee", api_key="auditee-key")
        sg.find("Sequence", [], ["code"])  # SG verifies the key (a pass)
        sg.find("Sequence", [], ["code"])  # a hit
        wait_until(lambda: hits() == 1, 10, "the hit's access line")
        wait_until(lambda: rig.site.count_by_script("read", "auditee") >= 2, 10, "the hit's shadow read")
        rig.site.revoke_script("auditee")
        audited = rig.site.count_by_script("read", "auditee")
        sg.find("Sequence", [], ["code"])  # a hit again; its shadow read is refused by SG
        wait_until(lambda: rig.site.count_by_script("read", "auditee") > audited, 10, "the refused shadow read")
        time.sleep(0.5)  # the audit thread notes SG's refusal after its read
        with pytest.raises(shotgun_api3.AuthenticationFault):
            sg.find("Sequence", [], ["code"])  # SG's own refusal
    finally:
        proxy.stop()
