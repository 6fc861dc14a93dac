"""The addon's hooks with mitmproxy's taddons/tflow: header marking, pass reasons, when SG counts as down."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from .conftest import BASIC_SCHEMA
from .proxyharness import ADDON

_spec = importlib.util.spec_from_file_location("sgcache_addon_under_test", ADDON)
assert _spec is not None and _spec.loader is not None
sgcache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sgcache)

AUTH = {"script_name": "pipeline", "script_key": "k"}


def api3_flow(body: bytes, host: str = "sg.example.shotgunstudio.com", headers: dict[str, str] | None = None) -> Any:
    req = tutils.treq(host=host, port=443, scheme=b"https", method=b"POST", path=b"/api3/json", content=body)
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
                tctx.configure(addon, sgcache_db=db_url, sgcache_schema=str(BASIC_SCHEMA), sgcache_max_lag=0)
                try:
                    return await test(addon, tctx)
                finally:
                    addon.done()

        return asyncio.run(main())

    yield runner


def respond(flow: Any, status: int = 200, body: bytes = b'{"results": []}') -> None:
    flow.response = http.Response.make(status, body, {"Content-Type": "application/json; charset=utf-8"})


def test_only_sg_hosts_are_decrypted(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        tctx.configure(addon, sgcache_hosts=["sg.studio.internal", "*.example.test"])
        allowed = tctx.options.allow_hosts
        assert any("shotgunstudio" in p for p in allowed) and any("studio" in p for p in allowed)
        flow = api3_flow(call("read", {"type": "Shot"}), host="uploads.s3.amazonaws.com")
        await addon.request(flow)
        assert "sgcache_pass" not in flow.metadata and flow.response is None  # not its business

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
        assert flow.metadata["sgcache_pass"] == reason
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
        addon.error(flow)
        assert not addon.down_until

        flow = api3_flow(call("read", {"type": "Shot"}))
        await addon.request(flow)
        respond(flow, 500, b"oops")  # one request failed: SG is not down
        await addon.response(flow)
        assert not addon.down_until

        flow = api3_flow(call("read", {"type": "Shot"}))
        await addon.request(flow)
        flow.server_conn.timestamp_tcp_setup = None  # never connected: SG is unreachable
        flow.error = tflow.terr("Connection refused")
        addon.error(flow)
        assert "sg.example.shotgunstudio.com" in addon.down_until

        flow = api3_flow(call("create", {"type": "Shot", "fields": []}))
        await addon.request(flow)  # offline: writes are refused in SG's envelope, never sent
        assert flow.response is not None and flow.response.headers["X-SGCache"] == "pass; reason=sg-unreachable"
        reply = json.loads(flow.response.content)
        assert reply["exception"] is True and "cannot be reached" in reply["message"]

    run(test)


def test_503_means_down(run: Any) -> None:
    async def test(addon: Any, tctx: Any) -> None:
        flow = api3_flow(call("info"))
        await addon.request(flow)
        respond(flow, 503, b"maintenance")
        await addon.response(flow)
        assert "sg.example.shotgunstudio.com" in addon.down_until

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
        assert flow.response is None and flow.metadata["sgcache_pass"] == "script-not-listed"
        other = {"script_name": "pipeline-readall", "script_key": "k"}
        body = json.dumps({"method_name": "read", "params": [other, {"type": "Shot"}]}).encode()
        flow = api3_flow(body)
        await addon.request(flow)
        assert flow.metadata["sgcache_pass"] == "auth-unverified"  # listed: cacheable once SG accepts it

    run(test)


def test_a_connection_whose_read_overran_gets_a_smaller_budget_and_keeps_its_hits(db_url: str) -> None:
    from cache.schema import Schema
    from cache.store import Store

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
                           sgcache_read_budget=20)
            try:
                addon.credentials.record(AUTH, True)
                flow = api3_flow(call("read", slow))
                await addon.request(flow)
                assert flow.response is None and flow.metadata["sgcache_pass"] == "slow-read"
                assert list(addon.slow_clients) == [flow.client_conn.id]
                first = flow
                flow = api3_flow(call("read", small))
                flow.client_conn = first.client_conn  # the same client connection: a smaller budget
                await addon.request(flow)
                assert flow.response is not None and flow.response.headers[sgcache.HEADER] == "hit"
                assert json.loads(flow.response.content)["results"]["entities"] == [
                    {"type": "Shot", "id": 7, "code": "sh7"}]
                assert addon.service is not None and addon.service._failures == 0
            finally:
                addon.done()

    asyncio.run(main())
