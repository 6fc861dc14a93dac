"""One replica, one site; no open relay. Real mitmdump, real shotgun_api3, two fake SG sites.

Site A is primed and served (``sgcache_site``); site B is another studio's site reached through the
same proxy (allowed by ``sgcache_allow_connect``, since the fake sites listen on loopback).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from cache.replica import site as sitemod
from cache.replica.schema import Schema
from cache.replica.store import Store

from .fakesg import FakeSGServer, FakeSite
from .paths import REPO
from .proxyharness import Proxy, connect_status, plain_status
from .rig import KEY, PROXY_PASSWORD, PROXY_USER, RIG_OPTIONS, SCRIPT, Rig


def populate_b(site: FakeSite) -> None:
    """Another studio: the same ids as site A's rows, other values."""
    project = site.create_direct("Project", {"name": "Other studio"})
    for i in range(12):
        site.create_direct("Shot", {"code": f"other{i:02d}", "project": {"type": "Project", "id": project["id"]}})


def raw_read(server_url: str, proxy: Proxy | None, entity_type: str, fields: list[str],
             proxy_user: str | None = None, path: str = "/api3/json") -> tuple[str, Any]:
    """One API3 read of ``server_url`` (posted to ``path``) through the proxy (as ``proxy_user``,
    "name:password", when given; None: straight to the server): (X-SGCache header, decoded reply)."""
    args = {"type": entity_type, "return_fields": fields, "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 500, "current_page": 1}, "return_paging_info": False}
    body = json.dumps({"method_name": "read", "params": [{"script_name": SCRIPT, "script_key": KEY}, args]})
    via = None if proxy is None else f"{proxy_user}@{proxy.address}" if proxy_user else proxy.address
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{via}"} if via else {}))
    req = urllib.request.Request(server_url + path, data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    with opener.open(req, timeout=30) as resp:
        return resp.headers.get("X-SGCache", ""), json.loads(resp.read())


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[tuple[Rig, FakeSGServer]]:
    site_b = FakeSite.basic()
    site_b.add_script(SCRIPT, KEY)  # the same script name and key at both sites
    populate_b(site_b)
    with FakeSGServer(site_b) as server_b:
        options = [*RIG_OPTIONS, f"sgcache_allow_connect=127.0.0.1:{server_b.port}"]
        with Rig(tmp_path_factory.mktemp("sites"), module_db_url, proxy=options) as rig:
            yield rig, server_b


def shot_codes(rig: Rig) -> dict[int, str]:
    """Shot id -> code as the replica holds them."""
    store = Store.open(rig.db_url, Schema.load(rig.schema_path), create=False)
    try:
        with store.engine.connect() as conn:
            table = store.tables["Shot"]
            return {r.id: r.code for r in conn.execute(table.select())}
    finally:
        store.dispose()


def test_the_scan_binds_the_replica_to_its_site(two_sites: tuple[Rig, FakeSGServer]) -> None:
    rig, _ = two_sites
    store = Store.open(rig.db_url, Schema.load(rig.schema_path), create=False)
    try:
        assert sitemod.stored_site(store) == sitemod.normalise(rig.server.url)
    finally:
        store.dispose()


def test_reads_of_another_site_pass_and_get_that_sites_answer(two_sites: tuple[Rig, FakeSGServer]) -> None:
    rig, server_b = two_sites
    sg = rig.client()
    sg.find_one("Project", [])  # SG accepts the credentials: site A's reads are hits from now on
    assert raw_read(rig.server.url, rig.proxy, "Shot", ["code"])[0] == "hit"
    expected_b = shotgun_api3.Shotgun(server_b.url, script_name=SCRIPT, api_key=KEY).find("Shot", [], ["code"])
    before_b = server_b.site.count("read")
    header, reply = raw_read(server_b.url, rig.proxy, "Shot", ["code"])
    assert header == "pass; reason=other-site"
    assert [{"type": r["type"], "id": r["id"], "code": r["code"]} for r in reply["results"]["entities"]] == expected_b
    assert server_b.site.count("read") == before_b + 1
    # the real client too: site B's answer, never site A's rows
    other = shotgun_api3.Shotgun(server_b.url, script_name=SCRIPT, api_key=KEY, http_proxy=rig.proxy.address)
    assert other.find("Shot", [], ["code"]) == expected_b
    assert other.find_one("Project", [], ["name"])["name"] == "Other studio"


@pytest.mark.parametrize("path", ["/some/prefix/api3/json", "/api3/json?x=1"])
def test_only_the_path_shotgun_api3_posts_to_is_the_sites_api3(two_sites: tuple[Rig, FakeSGServer],
                                                                path: str) -> None:
    """shotgun_api3 posts to exactly ``/api3/json`` (for a site named without a path): a read posted
    anywhere else, even to a path ending in /api3/json or with a query string, is not the proxy's
    business: SG (or whatever the site serves there) answers it, untouched."""
    rig, _ = two_sites
    rig.client().find_one("Project", [])  # SG accepts the credentials: the site's reads are hits
    assert raw_read(rig.server.url, rig.proxy, "Shot", ["code"])[0] == "hit"
    header, reply = raw_read(rig.server.url, rig.proxy, "Shot", ["code"], path=path)
    assert header == "" and reply == raw_read(rig.server.url, None, "Shot", ["code"], path=path)[1]
    assert [p for _, p, _, _ in rig.site.raw_requests].count(path) == 2  # both reached the site


def test_writes_to_another_site_change_nothing_in_the_replica(two_sites: tuple[Rig, FakeSGServer]) -> None:
    rig, server_b = two_sites
    codes = shot_codes(rig)
    other = shotgun_api3.Shotgun(server_b.url, script_name=SCRIPT, api_key=KEY, http_proxy=rig.proxy.address)
    first_id = min(codes)
    other.update("Shot", first_id, {"code": "overwritten"})  # the same id exists in the replica
    made = other.create("Shot", {"code": "b-only", "project": {"type": "Project", "id": 1}})
    direct_b = shotgun_api3.Shotgun(server_b.url, script_name=SCRIPT, api_key=KEY)
    assert direct_b.find_one("Shot", [["id", "is", made["id"]]], ["code"])["code"] == "b-only"
    assert direct_b.find_one("Shot", [["id", "is", first_id]], ["code"])["code"] == "overwritten"
    assert shot_codes(rig) == codes
    sg = rig.client()
    assert sg.find_one("Shot", [["id", "is", first_id]], ["code"])["code"] == codes[first_id]
    assert sg.find("Shot", [["code", "is", "b-only"]], ["code"]) == []


def test_tunnels_and_plain_requests_only_where_allowed(two_sites: tuple[Rig, FakeSGServer]) -> None:
    rig, server_b = two_sites
    site_port, b_port = rig.server.port, server_b.port
    for target in ("127.0.0.1:5432", "127.0.0.1:22", "127.0.0.1:47123", "localhost:5432",
                   "sg.example.test:8443", "[::1]:5432", "0.0.0.0:5432", "169.254.169.254:443"):
        status, body = connect_status(rig.proxy, target)
        assert status == 403, (target, body)
        assert b"refused" in body
    # port 443 is allowed, but not to a name or address of this host
    for target in ("localhost:443", "127.0.0.1:443", *([f"{own}:443"] if (own := own_address()) else [])):
        status, body = connect_status(rig.proxy, target)
        assert status == 403 and b"local address" in body, (target, body)
    assert connect_status(rig.proxy, f"127.0.0.1:{site_port}")[0] == 200  # the site
    assert connect_status(rig.proxy, f"127.0.0.1:{b_port}")[0] == 200  # named in sgcache_allow_connect
    for url in ("http://127.0.0.1:5432/", "http://127.0.0.1:22/", "http://127.0.0.1:47123/",
                "http://localhost/", "http://169.254.169.254/latest/meta-data/"):
        status, body = plain_status(rig.proxy, url)
        assert status == 403 and b"refused" in body, (url, body)
    for url in (f"http://127.0.0.1:{site_port}/", f"http://127.0.0.1:{b_port}/"):
        status, body = plain_status(rig.proxy, url)
        assert status not in (0, 403), (url, body)  # the fake SG's own answer
    assert "refused CONNECT 127.0.0.1:5432" in rig.proxy.output()


def test_client_authentication_comes_before_any_cached_answer(two_sites: tuple[Rig, FakeSGServer],
                                                               tmp_path: Path) -> None:
    """With mitmproxy's ``proxyauth`` (README, "Network exposure"), a client without the proxy's
    credentials gets 407 and nothing else: no cached answer, no request to SG; with them, hits."""
    rig, _ = two_sites
    proxy = rig.start_proxy([*RIG_OPTIONS, f"proxyauth={PROXY_USER}:{PROXY_PASSWORD}"], workdir=tmp_path)
    try:
        sg = shotgun_api3.Shotgun(rig.server.url, script_name=SCRIPT, api_key=KEY,
                                  http_proxy=f"{PROXY_USER}:{PROXY_PASSWORD}@{proxy.address}")
        sg.find_one("Project", [])  # SG accepts the script through this proxy: its reads are hits
        before = rig.reads()
        assert sg.find("Shot", [], ["code"])
        assert rig.reads() == before
        for user in (None, f"{PROXY_USER}:wrong"):
            before = rig.reads()
            with pytest.raises(urllib.error.HTTPError) as refused:
                raw_read(rig.server.url, proxy, "Shot", ["code"], proxy_user=user)
            assert refused.value.code == 407 and "X-SGCache" not in refused.value.headers
            assert rig.reads() == before
        assert connect_status(proxy, f"127.0.0.1:{rig.server.port}")[0] == 407
    finally:
        proxy.stop()


def own_address() -> str | None:
    """A non-loopback address of this host (the one its default route uses), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # UDP: picks the source address, sends nothing
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def run(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_programs_refuse_a_replica_of_another_site(tmp_path: Path, two_sites: tuple[Rig, FakeSGServer]) -> None:
    rig, server_b = two_sites
    ours, theirs = sitemod.normalise(rig.server.url), sitemod.normalise(server_b.url)
    codes = shot_codes(rig)
    env = rig.env(SGCACHE_SITE=server_b.url)
    for name, args in (("scan", ("--full", "--quiet")), ("ingest-events", ("--once",)), ("reprocess", ())):
        proc = run(name, env, *args)
        assert proc.returncode != 0, (name, proc.stdout, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if ours in line]
        assert len(lines) == 1 and theirs in lines[0], (name, proc.stderr)
    proxy = Proxy(tmp_path, rig.db_url, rig.schema_path, [*RIG_OPTIONS, f"sgcache_site={server_b.url}"])
    try:
        try:
            proxy.start()  # mitmdump may print "listening" before it exits on the start-up error
        except RuntimeError:
            pass
        assert proxy.wait_exit() not in (None, 0), "mitmdump kept running on another site's replica"
        refusal = [line for line in proxy.output().splitlines() if "OptionsError" in line]
        assert refusal and ours in refusal[-1] and theirs in refusal[-1], proxy.output()
    finally:
        proxy.stop()
    assert shot_codes(rig) == codes
    # the right site still starts (the binding is not changed by the refusals)
    (tmp_path / "ok").mkdir()
    with Proxy(tmp_path / "ok", rig.db_url, rig.schema_path, [*RIG_OPTIONS, f"sgcache_site={rig.server.url}"]):
        pass


def test_without_sgcache_site_the_proxy_serves_the_replicas_site(two_sites: tuple[Rig, FakeSGServer],
                                                                 tmp_path: Path) -> None:
    rig, server_b = two_sites
    with Proxy(tmp_path, rig.db_url, rig.schema_path, RIG_OPTIONS) as proxy:
        assert "serving the site stored in the replica" in proxy.output()
        sg = shotgun_api3.Shotgun(rig.server.url, script_name=SCRIPT, api_key=KEY, http_proxy=proxy.address)
        sg.find_one("Project", [])
        assert raw_read(rig.server.url, proxy, "Shot", ["code"])[0] == "hit"
