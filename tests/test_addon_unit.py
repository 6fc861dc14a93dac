"""The addon's hooks with mitmproxy's taddons/tflow: header marking, pass reasons, when SG counts as down."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons, tflow, tutils

from cache.proxy.auth import site_of
from cache.proxy.flowstate import state_of
from cache.replica import pending

from .paths import BASIC_SCHEMA
from .sgcache_addon import sgcache

AUTH = {"script_name": "pipeline", "script_key": "k"}
SITE = "https://sg.example.shotgunstudio.com"


def api3_flow(body: bytes, host: str = "sg.example.shotgunstudio.com", headers: dict[str, str] | None = None) -> Any:
    req = tutils.treq(host=host, port=443, scheme=b"https", method=b"POST", path=b"/api3/json", content=body)
    req.headers["Host"] = host  # as every client sends it (a request naming no host is no site's)
    for k, v in (headers or {}).items():
        req.headers[k] = v
    return tflow.tflow(req=req)


def call(method: str, args: Any = None) -> bytes:
    return json.dumps({"method_name": method, "params": [AUTH, args] if args is not None else [AUTH]}).encode()


@pytest.fixture
def run(db_url: str) -> Iterator[Any]:
    """run(coroutine_fn) with the addon configured inside taddons on a fresh replica."""

    def runner(test: Any) -> Any:
        async def main() -> Any:
            addon = sgcache.SGCache()
            with taddons.context(addon) as tctx:
                tctx.configure(addon, sgcache_db=db_url, sgcache_schema=str(BASIC_SCHEMA), sgcache_max_lag=0,
                               sgcache_site=SITE)
                try:
                    return await test(addon, tctx)
                finally:
                    await addon.done()

        return asyncio.run(main())

    yield runner


def respond(flow: Any, status: int = 200, body: bytes = b'{"results": []}') -> None:
    flow.response = http.Response.make(status, body, {"Content-Type": "application/json; charset=utf-8"})


def test_the_reverse_proxy_target_is_the_site(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        tctx.configure(addon, sgcache_site="", mode=["regular", f"reverse:{SITE}@8443"])
        assert addon.site is not None and addon.site.url == f"{SITE}:443"
        flow = api3_flow(call("read", {"type": "Shot"}))
        assert addon._is_site_api3(flow)
        with pytest.raises(exceptions.OptionsError, match="not the site"):
            tctx.configure(addon, sgcache_site=SITE, mode=["reverse:https://other.shotgunstudio.com"])
        with pytest.raises(exceptions.OptionsError, match="several"):
            tctx.configure(addon, sgcache_site="", mode=[f"reverse:{SITE}", "reverse:https://other.shotgunstudio.com@81"])

    run(test)


def test_a_site_named_with_a_path_has_its_api3_calls_there(run: Any) -> None:
    """shotgun_api3 posts to ``/sg/api3/json`` for a site named ``https://host/sg/``: that path is
    the site's API3, ``/api3/json`` is then not (whatever answers it, it is not that SG's API3)."""
    async def test(addon: Any, tctx: Any) -> None:
        tctx.configure(addon, sgcache_site=f"{SITE}/sg/")
        flow = api3_flow(call("read", {"type": "Shot"}))
        flow.request.path = "/sg/api3/json"
        assert addon._is_site_api3(flow)
        flow = api3_flow(call("read", {"type": "Shot"}))
        await addon.request(flow)
        assert state_of(flow.metadata).pass_reason is None and flow.response is None  # not its business

    run(test)


def test_an_upload_form_marks_the_type_it_names_pending(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        service = await addon.calls.service()
        flow = api3_flow(b"entity_type=Shot&entity_id=1&field_name=sg_link&script_name=pipeline&script_key=k")
        flow.request.path = "/upload/api_link_file"
        flow.request.headers["content-type"] = "application/x-www-form-urlencoded"
        await addon.request(flow)
        assert flow.response is None  # not API3: SG answers it
        respond(flow, 200, b"1:7\n")
        await addon.response(flow)
        with service.store.engine.connect() as conn:
            markers = pending.active(conn, service.store.pending)
        assert ("Shot", pending.WHOLE_TYPE) in markers and ("Asset", pending.WHOLE_TYPE) not in markers

    run(test)


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/upload/upload_file", b"entity_type=Shot&entity_id=1&script_name=nobody&script_key=no"),
    ("PUT", "/api/v1/entity/shots/1", b'{"code": "x"}'),
])
def test_a_broken_upload_or_rest_write_marks_while_its_client_waits_not_once_it_hung_up(
        run: Any, method: str, path: str, body: bytes) -> None:
    """SG may have applied it before the connection broke: marked while the client waits for the
    answer. A client that hung up reads nothing back; before, anyone could send such requests
    without credentials, hang up, and mark every type pending (every client's reads passed)."""
    async def test(addon: Any, tctx: Any) -> None:
        service = await addon.calls.service()

        def markers() -> Any:
            with service.store.engine.connect() as conn:
                return pending.active(conn, service.store.pending)

        flow = api3_flow(body)
        flow.request.method, flow.request.path = method, path
        await addon.request(flow)
        assert flow.response is None  # not API3: SG answers it
        flow.client_conn.state = ConnectionState.CLOSED  # the client hung up
        flow.error = tflow.terr("Client disconnected.")
        await addon.error(flow)
        assert markers() == frozenset()

        flow = api3_flow(body)
        flow.request.method, flow.request.path = method, path
        await addon.request(flow)
        flow.server_conn.timestamp_tcp_setup = 1.0  # sent to SG; its connection broke, the client waits
        flow.error = tflow.terr("server closed connection")
        await addon.error(flow)
        assert ("Shot", pending.WHOLE_TYPE) in markers()

    run(test)


def test_only_the_site_and_named_hosts_are_decrypted(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        def decrypted(hostport: str) -> bool:
            return any(re.search(rex, hostport, re.IGNORECASE) for rex in tctx.options.allow_hosts)

        assert decrypted("sg.example.shotgunstudio.com:443")
        assert not decrypted("sg.example.shotgunstudio.com:8443")
        assert not decrypted("other.shotgunstudio.com:443")  # no built-in tenant globs any more
        tctx.configure(addon, sgcache_hosts=["sg.studio.internal", "*.example.test"])
        assert decrypted("sg.example.shotgunstudio.com:443") and decrypted("sg.studio.internal:443")
        assert decrypted("a.example.test:8080") and not decrypted("uploads.s3.amazonaws.com:443")
        flow = api3_flow(call("read", {"type": "Shot"}), host="uploads.s3.amazonaws.com")
        flow.request.path = "/upload"
        await addon.request(flow)
        assert state_of(flow.metadata).pass_reason is None and flow.response is None  # not its business

    run(test)


@pytest.mark.parametrize(
    ("host", "port", "scheme", "host_header"),
    [
        ("other.shotgunstudio.com", 443, "https", None),  # another tenant
        ("sg.example.shotgunstudio.com", 8443, "https", None),  # another port
        ("sg.example.shotgunstudio.com", 443, "http", None),  # another scheme
        ("sg.example.shotgunstudio.com", 443, "https", "other.shotgunstudio.com"),  # another tenant's name
        # no Host header (HTTP/1.0 in absolute form): SG's front end picks the site it routes to
        ("sg.example.shotgunstudio.com", 443, "https", ""),
        # two Host headers (HTTP/2 lets a client send host twice): which one SG routes by is not known
        ("sg.example.shotgunstudio.com", 443, "https", "h2:other.shotgunstudio.com|sg.example.shotgunstudio.com"),
        # HTTP/2: the site's :authority and another tenant's host (sent on as HTTP/1's Host: mitmproxy checks
        # they match only with validate_inbound_headers, an option an operator may turn off)
        ("sg.example.shotgunstudio.com", 443, "https", "h2:other.shotgunstudio.com"),
    ],
)
def test_other_sites_pass_and_teach_nothing(run: Any, host: str, port: int, scheme: str,
                                            host_header: str | None) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        learned: list[Any] = []
        assert addon.service is not None
        addon.service.learn = lambda *a: learned.append(a) or []  # type: ignore[method-assign]
        flow = api3_flow(call("create", {"type": "Shot", "fields": [{"field_name": "code", "value": "x"}]}),
                         host=host)
        flow.request.port, flow.request.scheme = port, scheme
        if host_header and host_header.startswith("h2:"):  # HTTP/2: the site's :authority, and host headers
            flow.request.http_version = "HTTP/2.0"
            flow.request.authority = "sg.example.shotgunstudio.com"
            flow.request.headers.set_all("Host", host_header.removeprefix("h2:").split("|"))
        elif host_header:
            flow.request.headers["Host"] = host_header
        elif host_header == "":
            del flow.request.headers["Host"]
        await addon.request(flow)
        assert flow.response is None  # not sent by the addon: mitmproxy relays it untouched
        assert state_of(flow.metadata).pass_reason == "other-site" and state_of(flow.metadata).method is None
        respond(flow, 200, b'{"results": {"type": "Shot", "id": 2, "code": "x"}}')
        await addon.response(flow)
        assert flow.response.headers["X-SGCache"] == "pass; reason=other-site"
        assert learned == []
        flow.response = None
        flow.error = tflow.terr("Connection refused")
        await addon.error(flow)
        assert not addon.calls.outages.down_until  # another site being down is not this site's outage

    run(test)


def test_without_a_site_everything_passes(db_url: str) -> None:
    async def main() -> None:
        addon = sgcache.SGCache()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, sgcache_db=db_url, sgcache_schema=str(BASIC_SCHEMA), sgcache_site="")
            try:
                assert addon.site is None
                assert not any(re.search(r, "sg.example.shotgunstudio.com:443") for r in tctx.options.allow_hosts)
                flow = api3_flow(call("read", {"type": "Shot"}))
                await addon.request(flow)
                assert state_of(flow.metadata).pass_reason == "no-site" and flow.response is None
            finally:
                await addon.done()

    asyncio.run(main())


def test_a_replica_of_another_site_is_refused_at_start(db_url: str) -> None:
    async def main() -> None:
        addon = sgcache.SGCache()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, sgcache_db=db_url, sgcache_schema=str(BASIC_SCHEMA), sgcache_site=SITE)
            await addon.done()
            other = sgcache.SGCache()
            with pytest.raises(exceptions.OptionsError) as exc:
                tctx.configure(other, sgcache_site="https://other.shotgunstudio.com")
            assert "sg.example.shotgunstudio.com:443" in str(exc.value)
            assert "other.shotgunstudio.com:443" in str(exc.value)
            await other.done()
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(sgcache.SGCache(), sgcache_site="sg.example.shotgunstudio.com")  # no scheme
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(sgcache.SGCache(), sgcache_allow_connect=["nohostport"])

    asyncio.run(main())


def connect_flow(host: str, port: int) -> Any:
    flow = tflow.tflow(req=tutils.treq(method=b"CONNECT", host=host, port=port, path=b"", scheme=b""))
    return flow


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [("127.0.0.1", 5432, False), ("127.0.0.1", 22, False), ("sg.example.test", 40000, False),
     ("sg.example.shotgunstudio.com", 443, True), ("db.studio.internal", 5432, True)],
)
def test_connect_policy(run: Any, host: str, port: int, allowed: bool) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        tctx.configure(addon, sgcache_allow_connect=["db.studio.internal:5432"])
        flow = connect_flow(host, port)
        await addon.http_connect(flow)
        if allowed:
            assert flow.response is None
        else:
            assert flow.response.status_code == 403
            assert b"refused" in flow.response.content and flow.response.content.count(b"\n") == 1
        plain = tflow.tflow(req=tutils.treq(host=host, port=port, scheme=b"http", method=b"GET", path=b"/"))
        await addon.requestheaders(plain)
        assert (plain.response is None) is (allowed and port != 443), plain.response

    run(test)


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b"{not json", {}, "not-api3"),
        (b'{"method_name": "read", "params": [{}, {"a": NaN}]}', {}, "not-api3"),
        ('{"method_name": "read"}'.encode("utf-16"), {}, "not-api3"),
        (call("read", {"type": "Shot"}), {"Content-Encoding": "gzip"}, "content-encoding"),
        (call("schema_read", {}), {}, "method"),  # writes are sent by the addon itself: see test_e2e_production
        (call("read", {"type": "Shot"}), {}, "auth-unverified"),
    ],
)
def test_passes_are_marked_with_their_reason(run: Any, body: bytes, headers: dict[str, str], reason: str) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        flow = api3_flow(body, headers=headers)
        await addon.request(flow)
        assert flow.response is None
        assert state_of(flow.metadata).pass_reason == reason
        raw = flow.request.raw_content
        respond(flow)
        await addon.response(flow)
        assert flow.response.headers["X-SGCache"] == f"pass; reason={reason}"
        assert flow.request.raw_content == raw  # passed unchanged

    run(test)


def test_unreachable_sg_means_offline_but_a_dropped_request_does_not(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        flow = api3_flow(call("read", {"type": "Shot"}))
        await addon.request(flow)
        flow.server_conn.timestamp_tcp_setup = 1.0  # SG accepted the connection, then dropped this request
        flow.error = tflow.terr("server closed connection")
        await addon.error(flow)
        assert not addon.calls.outages.down_until

        flow = api3_flow(call("read", {"type": "Shot"}))
        await addon.request(flow)
        respond(flow, 500, b"oops")  # one request failed: SG is not down
        await addon.response(flow)
        assert not addon.calls.outages.down_until

        flow = api3_flow(call("read", {"type": "Shot"}))
        await addon.request(flow)
        flow.client_conn.state = ConnectionState.CLOSED  # the client hung up before SG was reached
        flow.error = tflow.terr("Client disconnected.")
        await addon.error(flow)
        assert not addon.calls.outages.down_until

        flow = api3_flow(call("read", {"type": "Shot"}))
        await addon.request(flow)
        server = tflow.tserver_conn()  # mitmproxy's connection to SG: it could not be made
        server.address, server.error = ("sg.example.shotgunstudio.com", 443), "Connection refused"
        addon.server_connect_error(ServerConnectionHookData(server=server, client=flow.client_conn))
        flow.server_conn.timestamp_tcp_setup = None  # never connected: SG is unreachable
        flow.error = tflow.terr("Connection refused")
        await addon.error(flow)
        assert "sg.example.shotgunstudio.com" in addon.calls.outages.down_until

        flow = api3_flow(call("create", {"type": "Shot", "fields": []}))
        await addon.request(flow)  # offline: writes are refused in SG's envelope, never sent
        assert flow.response is not None and flow.response.headers["X-SGCache"] == "pass; reason=sg-unreachable"
        reply = json.loads(flow.response.content)
        assert reply["exception"] is True and "cannot be reached" in reply["message"]

    run(test)


def test_503_on_three_client_connections_means_down(run: Any) -> None:
    """One client's 502/504 (a request that outlasted the load balancer, and shotgun_api3's re-send
    on the same connection) is its own failure; the same answer on three connections: SG is down."""
    async def test(addon: Any, tctx: Any) -> None:
        first = api3_flow(call("info"))
        for n, down in enumerate((False, False, False, True)):
            flow = api3_flow(call("info"))
            if n == 1:
                flow.client_conn = first.client_conn  # the re-send, on the first one's connection
            await addon.request(flow)
            respond(flow, 503, b"maintenance")
            await addon.response(flow)
            assert ("sg.example.shotgunstudio.com" in addon.calls.outages.down_until) is down, n
            first = first if n else flow

    run(test)


def test_info_gains_the_sgcache_key(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        flow = api3_flow(json.dumps({"method_name": "info", "params": []}).encode())
        await addon.request(flow)
        respond(flow, 200, b'{"version": [8, 0, 0], "s3_uploads_enabled": false}')
        await addon.response(flow)
        reply = json.loads(flow.response.content)
        assert reply["version"] == [8, 0, 0] and reply["s3_uploads_enabled"] is False
        assert reply["sgcache"]["version"] and "lag_seconds" in reply["sgcache"]
        assert flow.response.headers["X-SGCache"] == "pass; reason=method"

    run(test)


def test_only_listed_scripts_are_served(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        tctx.configure(addon, sgcache_scripts=["pipeline-readall"])
        flow = api3_flow(call("read", {"type": "Shot"}))  # AUTH's script is not listed
        await addon.request(flow)
        assert flow.response is None and state_of(flow.metadata).pass_reason == "script-not-listed"
        other = {"script_name": "pipeline-readall", "script_key": "k"}
        body = json.dumps({"method_name": "read", "params": [other, {"type": "Shot"}]}).encode()
        flow = api3_flow(body)
        await addon.request(flow)
        assert state_of(flow.metadata).pass_reason == "auth-unverified"  # listed: cacheable once SG accepts it

    run(test)


def test_a_connection_whose_read_overran_gets_a_smaller_budget_and_keeps_its_hits(db_url: str) -> None:
    from cache.replica.schema import Schema
    from cache.replica.store import Store

    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    blank = dict.fromkeys(store.schema.entities["Shot"].fields)
    with store.engine.begin() as conn:
        store.write_entities(conn, "Shot", [{**blank, "id": i, "code": f"sh{i}", "description": "words " * 20}
                                            for i in range(1, 3001)], "scan", complete=True)
        store.mark_primed(conn, "Shot")
    store.dispose()

    def read_args(conditions: list[Any]) -> dict[str, Any]:
        return {"type": "Shot", "return_fields": ["code"], "return_only": "active",
                "filters": {"logical_operator": "or", "conditions": conditions},
                "paging": {"entities_per_page": 10, "current_page": 1}}

    slow = read_args([{"path": "description", "relation": "contains", "values": [f"nowhere {i}"]}
                      for i in range(300)])
    small = read_args([{"path": "id", "relation": "is", "values": [7]}])

    async def main() -> None:
        addon = sgcache.SGCache()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, sgcache_db=db_url, sgcache_schema=str(BASIC_SCHEMA), sgcache_max_lag=0,
                           sgcache_read_budget=20, sgcache_site=SITE)
            try:
                addon.calls.credentials.observe("read", site_of("https", "sg.example.shotgunstudio.com", 443), AUTH,
                                          {"results": []})
                flow = api3_flow(call("read", slow))
                await addon.request(flow)
                assert flow.response is None and state_of(flow.metadata).pass_reason == "slow-read"
                assert list(addon.calls.reads.slow_clients.until) == [flow.client_conn.id]
                first = flow
                flow = api3_flow(call("read", small))
                flow.client_conn = first.client_conn  # the same client connection: a smaller budget
                await addon.request(flow)
                assert flow.response is not None and flow.response.headers[sgcache.HEADER] == "hit"
                assert json.loads(flow.response.content)["results"]["entities"] == [
                    {"type": "Shot", "id": 7, "code": "sh7"}]
                assert addon.service is not None and addon.service.breaker.failures == 0
            finally:
                await addon.done()

    asyncio.run(main())


def test_every_upstream_connection_is_checked_before_it_opens(run: Any) -> None:
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData

    async def test(addon: Any, tctx: Any) -> None:
        tctx.configure(addon, sgcache_allow_connect=["db.studio.internal:5432"])
        for address, refused in [(("127.0.0.1", 5432), True), (("127.0.0.1", 8080), True),
                                 (("sg.example.shotgunstudio.com", 443), False), (("db.studio.internal", 5432), False),
                                 (("files.example.test", 80), False), (("files.example.test", 8080), True)]:
            data = ServerConnectionHookData(client=tflow.tclient_conn(), server=tflow.tserver_conn())
            data.server.address = address
            data.server.error = None
            await addon.server_connect(data)
            assert (data.server.error is not None) is refused, (address, data.server.error)

    run(test)


def test_the_site_comes_from_the_replica_when_none_is_configured(db_url: str, tmp_path: Any) -> None:
    from .databases import fresh_db_url

    async def main() -> None:
        addon = sgcache.SGCache()
        with taddons.context(addon) as tctx, fresh_db_url(tmp_path / "other") as other_db:
            (tmp_path / "other").mkdir(exist_ok=True)
            tctx.configure(addon, sgcache_db=db_url, sgcache_schema=str(BASIC_SCHEMA), sgcache_site=SITE)
            tctx.configure(addon, sgcache_site="")  # the replica is bound now: its site is served
            try:
                assert addon.site is not None and addon.site.url == SITE + ":443"
                assert any(re.search(r, "sg.example.shotgunstudio.com:443") for r in tctx.options.allow_hosts)
                tctx.configure(addon, sgcache_db=other_db)  # an unbound replica: no site any more
                assert addon.site is None
                assert not any(re.search(r, "sg.example.shotgunstudio.com:443") for r in tctx.options.allow_hosts)
                tctx.configure(addon, sgcache_db=db_url)
                assert addon.site is not None
                tctx.configure(addon, sgcache_db=f"sqlite:///{tmp_path / 'no-such-dir' / 'r.db'}")  # cannot open
                assert addon.service is None and addon.site is None  # not the previous replica's site
            finally:
                await addon.done()

    asyncio.run(main())


def _read_flow(auth: Any, host: str = "sg.example.shotgunstudio.com") -> Any:
    return api3_flow(json.dumps({"method_name": "read", "params": [auth, {"type": "Shot"}]}).encode(), host=host)


async def _exchange(addon: Any, flow: Any, status: int = 200, body: bytes = b'{"results": []}') -> None:
    await addon.request(flow)
    if flow.response is None:
        respond(flow, status, body)
    await addon.response(flow)


def test_info_never_verifies_a_credential(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        made_up = {"script_name": "eve", "script_key": "guess"}
        info = api3_flow(json.dumps({"method_name": "info", "params": [made_up]}).encode())
        await _exchange(addon, info, body=b'{"version": [8, 0, 0]}')
        flow = _read_flow(made_up)
        await addon.request(flow)
        assert flow.response is None and state_of(flow.metadata).pass_reason == "auth-unverified"

    run(test)


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (200, b'{"exception": true, "error_code": 1, "message": "bad"}', "application/json"),
        (200, b'{"exception": true, "error_code": 102, "message": "no"}', "application/json"),
        (200, b'{"results": []}', "text/html"),
        (200, b"<html>login</html>", "text/html"),
        (403, b'{"results": []}', "application/json"),
        (500, b'{"results": []}', "application/json"),
    ],
)
def test_only_sg_success_envelopes_verify(run: Any, status: int, body: bytes, content_type: str) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        flow = _read_flow(AUTH)
        await addon.request(flow)
        flow.response = http.Response.make(status, body, {"Content-Type": content_type})
        await addon.response(flow)
        again = _read_flow(AUTH)
        await addon.request(again)
        assert state_of(again.metadata).pass_reason == "auth-unverified"

    run(test)


def test_answers_not_from_sg_never_verify(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        replayed = _read_flow(AUTH)
        await addon.request(replayed)
        replayed.is_replay = "response"  # e.g. mitmproxy's server replay answered it
        respond(replayed)
        await addon.response(replayed)
        unconnected = _read_flow(AUTH)
        await addon.request(unconnected)
        unconnected.server_conn.timestamp_start = None  # another addon answered: SG never saw it
        respond(unconnected)
        await addon.response(unconnected)
        flow = _read_flow(AUTH)
        await addon.request(flow)
        assert state_of(flow.metadata).pass_reason == "auth-unverified"
        # the same credential answered by SG: verified, for this site only
        await _exchange(addon, _read_flow(AUTH))
        flow = _read_flow(AUTH)
        await addon.request(flow)
        assert state_of(flow.metadata).pass_reason != "auth-unverified"
        flow = _read_flow(AUTH, host="other.shotgunstudio.com")
        await addon.request(flow)
        assert state_of(flow.metadata).pass_reason == "other-site"  # (per-site credentials: tests/test_auth.py)

    run(test)


def test_offline_refusals_never_verify(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        addon.calls.outages.down_until["sg.example.shotgunstudio.com"] = 1e18  # SG unreachable: the addon answers itself
        flow = api3_flow(call("schema_read", {}))
        await addon.request(flow)
        assert flow.response is not None and flow.response.headers["X-SGCache"] == "pass; reason=sg-unreachable"
        flow.response = http.Response.make(200, b'{"results": {}}', {"Content-Type": "application/json"})
        await addon.response(flow)  # even a success-looking body made here verifies nothing
        addon.calls.outages.down_until.clear()
        flow = _read_flow(AUTH)
        await addon.request(flow)
        assert state_of(flow.metadata).pass_reason == "auth-unverified"

    run(test)


@pytest.mark.parametrize(
    "auth",
    [
        {"script_name": ["pipeline-readall"], "script_key": "k"},
        {"script_name": {"n": 1}, "script_key": "k"},
        {"script_name": "pipeline-readall", "script_key": ["k"]},
        {"script_name": "pipeline-readall", "script_key": "k" * 100_000},
        {"script_name": "pipeline-readall", "script_key": "k\udfff"},  # a lone surrogate: no UTF-8 holds it
        {"script_name": "pipeline-readall", "script_key": "k", "x": "\ud800"},
        {"script_name": "pipeline-readall", "script_key": "k", "\ud800": 1},
        ["pipeline-readall", "k"],
        "pipeline-readall",
    ],
)
def test_odd_auth_shapes_pass_with_a_reason(run: Any, auth: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        tctx.configure(addon, sgcache_scripts=["pipeline-readall"])
        flow = _read_flow(auth)
        await addon.request(flow)
        assert flow.response is None and state_of(flow.metadata).pass_reason in ("bad-auth", "no-auth")
        respond(flow, 200, b'{"exception": true, "error_code": 102, "message": "no"}')
        await addon.response(flow)
        assert flow.response.headers["X-SGCache"].startswith("pass; reason=")
        assert json.loads(flow.response.content)["error_code"] == 102  # SG's answer, untouched

    run(test)


def test_learning_never_raises_into_the_addon(run: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        service = addon.service
        service.breaker.failures = 99
        service.breaker.open_until = 1e18  # the breaker is open: learn would meet db-backoff
        assert service.learn("update", {"type": "Shot", "id": 1, "fields": []}, {"type": "Shot", "id": 1}) == []

        def broken(*_args: Any) -> Any:
            raise RuntimeError("boom")

        service.learn = broken
        flow = api3_flow(call("update", {"type": "Shot", "id": 1, "fields": []}))
        state = state_of(flow.metadata)
        state.method, state.auth, state.args = "update", AUTH, {"type": "Shot", "id": 1, "fields": []}
        state.pass_reason = "method"
        respond(flow, 200, b'{"results": {"type": "Shot", "id": 1}}')
        await addon.response(flow)  # logged, not raised
        assert flow.response.headers["X-SGCache"] == "pass; reason=method"

    run(test)
    assert "not recorded" in caplog.text


def test_an_error_in_the_request_hook_never_sends_a_write_twice(run: Any, caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy sends a request on when a hook raises: after the proxy's sender took a write, the
    client gets SG's error envelope (outcome unknown; what it may have changed marked pending);
    before, the request passes (internal-error), marked."""
    async def test(addon: Any, tctx: Any) -> None:
        sent: list[Any] = []

        async def broken_send(replica: Any, request: Any, state: Any, *_args: Any) -> Any:
            state.sent = True
            sent.append(request)
            raise RuntimeError("boom after sending")

        addon.calls.writes.send = broken_send
        update = {"type": "Shot", "id": 1, "fields": [{"field_name": "code", "value": "x"}]}
        flow = api3_flow(call("update", update))
        await addon.request(flow)
        assert len(sent) == 1 and flow.response is not None  # answered: mitmproxy sends nothing
        assert flow.response.headers["X-SGCache"] == "pass; reason=outcome-unknown"
        assert "it may have been applied" in json.loads(flow.response.content)["message"]
        with addon.service.store.engine.connect() as conn:
            assert ("Shot", "code") in pending.active(conn, addon.service.store.pending)

        def broken_reads(*_args: Any) -> Any:
            raise RuntimeError("boom before sending")

        addon.calls.credentials.reason = broken_reads
        flow = _read_flow(AUTH)
        await addon.request(flow)
        assert flow.response is None and state_of(flow.metadata).pass_reason == "internal-error"
        respond(flow)
        await addon.response(flow)
        assert flow.response.headers["X-SGCache"] == "pass; reason=internal-error"

    run(test)
    assert "boom after sending" in caplog.text and "boom before sending" in caplog.text


def test_answers_to_bodies_the_addon_did_not_decode_never_verify(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        body = json.dumps({"method_name": "read", "params": [AUTH, {"type": "Shot"}]}).encode()
        for headers in ({"Content-Encoding": "gzip"}, {"Content-Encoding": "br"}):
            flow = api3_flow(body, headers=headers)
            await addon.request(flow)
            assert state_of(flow.metadata).pass_reason == "content-encoding"
            respond(flow)
            await addon.response(flow)
        upload = api3_flow(body)
        upload.request.path = "/upload/api_link_file"  # not API3: the addon never looks at it
        await addon.request(upload)
        respond(upload)
        await addon.response(upload)
        flow = _read_flow(AUTH)
        await addon.request(flow)
        assert state_of(flow.metadata).pass_reason == "auth-unverified"

    run(test)


def test_the_flow_state_survives_mitmproxy_saving_and_copying_the_flow(run: Any) -> None:
    import io

    from mitmproxy import io as mitmio

    async def test(addon: Any, tctx: Any) -> None:
        flow = api3_flow(call("update", {"type": "Shot", "id": 1, "fields": []}))
        state = state_of(flow.metadata)
        state.method, state.args, state.pass_reason, state.write_mark = "update", {"type": "Shot"}, "method", 5
        saved = io.BytesIO()
        mitmio.FlowWriter(saved).add(flow)  # mitmdump -w, mitmweb: metadata holds plain values only
        saved.seek(0)
        loaded = next(iter(mitmio.FlowReader(saved).stream()))
        assert state_of(loaded.metadata).write_mark == 5 and state_of(flow.copy().metadata).method == "update"

    run(test)



def test_running_makes_connections_lazy_and_puts_the_startup_objects_out_of_the_collectors_sight(db_url: str) -> None:
    import gc

    from mitmproxy.addons.proxyserver import Proxyserver

    async def main() -> None:
        addon = sgcache.SGCache()
        with taddons.context(addon, Proxyserver()) as tctx:
            tctx.configure(addon, sgcache_db=db_url, sgcache_schema=str(BASIC_SCHEMA), sgcache_max_lag=0,
                           sgcache_site=SITE)
            gc.unfreeze()
            try:
                addon.running()
                assert tctx.options.connection_strategy == "lazy"
                assert gc.get_freeze_count() > 0  # the replica open, the modules loaded: frozen
            finally:
                gc.unfreeze()  # (this test process's objects, which the collector must see again)
                await addon.done()

    asyncio.run(main())
