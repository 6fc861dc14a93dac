"""The operator's view without a proxy: access-log lines, the recent window, mitmproxy's connection
lines demoted, HOST:PORT parsing, the status page's HTML and the status server's routes."""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cache.mitm.ops_addon import lines_as_logged
from cache.ops import server as server_module
from cache.ops.access import ConnectionNoise, RequestRecord, format_line, who
from cache.ops.metrics import IngestMetrics, ProxyMetrics, parse_hostport, serve
from cache.ops.page import PageData, render
from cache.ops.recent import Recent, Window
from cache.ops.server import StatusServer
from cache.ops.status import ReplicaStatus

from .paths import REPO

RECORD = RequestRecord(method="read", entity_type="Shot", outcome="pass", reason="empty-or", rows=0, ms=12.345,
                       status=200, client="10.0.0.7", who='odd "name" x=1')



def test_block_buffered_output_is_made_line_buffered() -> None:
    raw = io.BytesIO()
    piped = io.TextIOWrapper(raw, encoding="utf-8")  # stdout on a pipe: written in 8 kB blocks
    piped.write("before\n")
    assert lines_as_logged(piped) is True
    assert raw.getvalue() == b"before\n"  # what waited in the buffer is written at once
    piped.write("a log line\n")
    assert raw.getvalue() == b"before\na log line\n"
    assert lines_as_logged(piped) is False  # already line by line
    assert lines_as_logged(io.StringIO()) is False  # not a file's text layer: left alone

def test_access_line_as_json_and_logfmt() -> None:
    assert json.loads(format_line(RECORD, "json")) == {
        "method": "read", "entity_type": "Shot", "outcome": "pass", "reason": "empty-or", "rows": 0, "ms": 12.3,
        "status": 200, "client": "10.0.0.7", "who": 'odd "name" x=1'}
    line = format_line(RECORD, "logfmt")
    assert line.startswith("method=read entity_type=Shot outcome=pass reason=empty-or rows=0 ms=12.3 ")
    # a value with spaces, quotes or '=' is quoted so the pairs stay parseable
    assert dict(pair.split("=", 1) for pair in shlex.split(line))["who"] == 'odd "name" x=1'
    hit = RequestRecord("read", "Shot", "hit", None, 12, 1.0, 200, "::1")
    assert "reason" not in format_line(hit, "logfmt") and "who" not in format_line(hit, "logfmt")


def test_who_never_names_a_secret() -> None:
    assert who({"script_name": "pipe", "script_key": "k"}) == "pipe"
    assert who({"user_login": "ann", "user_password": "p"}) == "ann"
    assert who({"session_token": "t"}) == "session"
    assert who(None) is None


def test_recent_window_forgets_and_rates_reads_only() -> None:
    now = [1000.0]
    recent = Recent(window=60, clock=lambda: now[0])
    recent.add("Shot", "stale")
    now[0] += 120
    for reason in (None, None, None, "not-primed", "method"):
        recent.add("Shot", reason)
    w = recent.window_totals()
    assert (w.hits["Shot"], w.passes["Shot"], dict(w.reasons)) == (3, 2, {"not-primed": 1, "method": 1})
    assert w.hit_rate() == w.hit_rate("Shot") == 0.75  # the 'method' pass is not a read
    assert Window(60).hit_rate() is None


def test_connection_lines_are_demoted_to_debug() -> None:
    noise = ConnectionNoise()
    record = logging.LogRecord("mitmproxy.proxy.server", logging.INFO, "", 0, "client connect", None, None)
    other = logging.LogRecord("mitmproxy.proxy.server", logging.INFO, "", 0, "Closing connection", None, None)
    assert noise.filter(record) and noise.filter(other)
    assert (record.levelno, other.levelno) == (logging.DEBUG, logging.INFO)


@pytest.mark.parametrize(("value", "expected"), [("127.0.0.1:9180", ("127.0.0.1", 9180)),
                                                 ("[::1]:0", ("::1", 0))])
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value", ["9180", "host:", ":9180", "host:99999", "host:x"])
def test_parse_hostport_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_page_escapes_and_says_why_it_passes() -> None:
    status = ReplicaStatus(site="https://sg<x>", problem="stale: ingester heartbeat missing", primed={"Shot": 3})
    window = Window(300)
    window.hits["Shot"] += 1
    page = render(PageData(status=status, recent=window, version="1"))
    assert "https://sg&lt;x&gt;" in page and "<x>" not in page
    assert "passing: stale: ingester heartbeat missing" in page and 'http-equiv="refresh"' in page
    assert "audit not enabled" in page and "<script" not in page


def test_status_server_routes() -> None:
    metrics = ProxyMetrics()
    metrics.hits.labels(entity_type="Shot").inc()
    health = [ReplicaStatus(problem=None)]
    server = StatusServer("127.0.0.1:0", metrics.registry, lambda: health[0], lambda: "<p>page</p>").start()
    try:
        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(server.url + path, timeout=5) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        assert get("healthz") == (200, "ok: serving reads\n")
        health[0] = ReplicaStatus(problem="database error: OperationalError")
        assert get("healthz") == (503, "database error: OperationalError\n")
        assert 'sgcache_hits_total{entity_type="Shot"} 1.0' in get("metrics")[1]
        assert get("") == (200, "<p>page</p>")
        assert get("nope")[0] == 404
    finally:
        server.stop()


def test_status_server_closes_idle_and_surplus_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that connect and send nothing neither hold a thread for ever nor pile threads up."""
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(server_module._Handler, "timeout", 0.5)
    server = StatusServer("127.0.0.1:0", ProxyMetrics().registry, lambda: ReplicaStatus(problem=None),
                          lambda: "<p>page</p>").start()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)  # both taken by the server
        surplus = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        with surplus:
            assert surplus.recv(100) == b""  # closed at once: two are open
        for sock in idle:  # closed by the server once idle for the handler's timeout
            started = time.monotonic()
            assert sock.recv(100) == b""
            assert time.monotonic() - started < 4
        time.sleep(0.2)
        with urllib.request.urlopen(server.url + "healthz", timeout=5) as resp:  # their slots are free again
            assert resp.status == 200
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_sidecar_metrics_server_closes_idle_and_surplus_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingester's and the scanner's ``--metrics`` server, bounded as the status server is: an
    idle connection is closed, and past the bound a new one is closed at once; scrapes still work."""
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(server_module, "IDLE_SECONDS", 0.5)
    metrics = IngestMetrics()
    metrics.polls.inc()
    httpd = serve("127.0.0.1:0", metrics.registry, "ingester")
    port = httpd.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)  # both taken by the server
        with socket.create_connection(("127.0.0.1", port), timeout=5) as surplus:
            assert surplus.recv(100) == b""  # closed at once: two are open
        for sock in idle:  # closed by the server once idle
            started = time.monotonic()
            assert sock.recv(100) == b""
            assert time.monotonic() - started < 4
        time.sleep(0.2)
        for path in ("metrics", ""):  # any path, as prometheus_client's server answered
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=5) as resp:
                assert resp.status == 200 and b"sgcache_ingester_polls_total 1.0" in resp.read()
    finally:
        for sock in idle:
            sock.close()
        httpd.shutdown()
        httpd.server_close()


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_alert_rules_in_the_docs_are_valid(tmp_path: Path) -> None:
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    rules = [block for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if "groups:" in block]
    assert len(rules) == 1
    (tmp_path / "rules.yml").write_text(rules[0], encoding="utf-8")
    proc = subprocess.run([str(PROMTOOL), "check", "rules", str(tmp_path / "rules.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for alert in ("SgcacheIngesterDown", "SgcacheLagHigh", "SgcacheHitRateFell", "SgcacheAuditDisagreement",
                  "SgcacheBreakerOpen"):
        assert f"alert: {alert}" in rules[0]


def test_ops_addon_logs_and_counts_a_flow(caplog: pytest.LogCaptureFixture) -> None:
    """The addon's SGCacheOps hooks, without a proxy: an SG 502 to a read that passed."""
    from mitmproxy.test import taddons, tflow, tutils

    from cache.ops.metrics import PROXY
    from cache.proxy.flowstate import state_of

    from .sgcache_addon import sgcache

    def value(name: str, **labels: str) -> float:
        return PROXY.registry.get_sample_value(name, labels) or 0.0

    addon = sgcache.SGCacheOps(sgcache.SGCache())
    before = (value("sgcache_upstream_errors_total", kind="http-5xx"),
              value("sgcache_passes_total", reason="auth-unverified", entity_type="other"))
    with taddons.context(addon) as tctx, caplog.at_level(logging.INFO, logger="sgcache.access"):
        tctx.configure(addon, sgcache_access_log="json")
        flow = tflow.tflow(resp=tutils.tresp(status_code=502))
        state = state_of(flow.metadata)
        state.method, state.args, state.pass_reason = "read", {"type": "Shot"}, "auth-unverified"
        state.auth = {"script_name": "pipeline", "script_key": "sk-never"}
        addon.response(flow)
        addon.done()
    after = (value("sgcache_upstream_errors_total", kind="http-5xx"),
             value("sgcache_passes_total", reason="auth-unverified", entity_type="other"))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)  # no replica open: Shot is not a known type
    [line] = [r.getMessage() for r in caplog.records if r.name == "sgcache.access"]
    record = json.loads(line)
    assert (record["method"], record["outcome"], record["reason"], record["status"], record["who"]) == \
        ("read", "pass", "auth-unverified", 502, "pipeline")
    assert "sk-never" not in line


@pytest.mark.parametrize(("method", "sg_status", "answered_here", "counted"), [
    ("create", 500, True, 1),  # SG's 500 to a write: the client got "may have been applied"
    ("update", 503, True, 1),
    ("read", 502, True, 1),  # SG's 502 to a read the replica then answered (offline)
    ("read", None, True, 0),  # a hit: SG never answered
    ("create", 200, True, 0),
])
def test_every_5xx_sg_sent_is_an_upstream_error(method: str, sg_status: int | None, answered_here: bool,
                                                counted: int) -> None:
    from mitmproxy.test import taddons, tflow, tutils

    from cache.ops.metrics import PROXY
    from cache.proxy.flowstate import state_of

    from .sgcache_addon import sgcache

    def value() -> float:
        return PROXY.registry.get_sample_value("sgcache_upstream_errors_total", {"kind": "http-5xx"}) or 0.0

    addon = sgcache.SGCacheOps(sgcache.SGCache())
    before = value()
    with taddons.context(addon):
        flow = tflow.tflow(resp=tutils.tresp(status_code=200))  # the proxy's own answer
        state = state_of(flow.metadata)
        state.method, state.args, state.answered_here, state.sg_status = method, {"type": "Shot"}, answered_here, \
            sg_status
        state.pass_reason = "method"
        addon.response(flow)
        addon.done()
    assert value() - before == counted
