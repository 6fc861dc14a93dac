"""cache/proxy/upstream.py and sending.py without a proxy: a write sent once to a local HTTP server,
what stands in for SG's answer when it is lost, and learning from SG's answer (a fake replica)."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cache.errors import Passthrough
from cache.proxy import upstream
from cache.proxy.answers import HEADER, Answer
from cache.proxy.flowstate import state_of
from cache.proxy.outage import Outages
from cache.proxy.replica import Replica
from cache.proxy.sending import Outgoing, Writes

AUTH = {"script_name": "pipeline", "script_key": "k"}


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok answers JSON, /error HTTP 500, /slow after a second, /drop closes without an answer;
    /keep answers and keeps the connection, /keep-then-close answers then closes it (as a server
    closes an idle connection, without saying so in the answer)."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, dict[str, str], bytes]] = []
    connections = 0
    closed = threading.Event()

    def setup(self) -> None:
        Handler.connections += 1
        super().setup()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Handler.seen.append((self.path, dict(self.headers.items()), body))
        if self.path.startswith("/drop"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.path.startswith("/keep"):
            payload = json.dumps({"results": {"type": "Shot", "id": 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
            if self.path.startswith("/keep-then-close"):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                Handler.closed.set()
            return
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        status = 500 if self.path.startswith("/error") else 200
        payload = json.dumps({"results": {"type": "Shot", "id": 1}, "echo": json.loads(body or b"null")}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    Handler.seen, Handler.connections = [], 0
    Handler.closed = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_send_once_forwards_the_request_without_hop_by_hop_headers(server: tuple[str, int]) -> None:
    host, port = server
    headers = [("Content-Type", "application/json"), ("Connection", "keep-alive"), ("Proxy-Authorization", "x"),
               ("X-Custom", "1"), ("Host", "elsewhere")]
    reply = upstream.send_once("http", host, port, "/ok", headers, b'{"a": 1}')
    assert reply.status == 200 and json.loads(reply.body)["echo"] == {"a": 1}
    assert all(k.lower() not in ("connection", "content-length") for k, _ in reply.headers)
    _path, seen, _body = Handler.seen[-1]
    assert seen["Host"] == f"{host}:{port}" and seen["X-Custom"] == "1"
    assert "Proxy-Authorization" not in seen and seen["Content-Length"] == "8"


def test_send_once_forwards_header_bytes_as_the_client_sent_them(server: tuple[str, int]) -> None:
    """mitmproxy decodes header bytes as UTF-8 (other bytes kept as surrogates); they go to SG
    unchanged (http.client would encode latin-1: "é" changed, "€" a UnicodeEncodeError)."""
    headers = [("X-Note", "price \u20ac, caf\u00e9"), ("X-Raw", b"\xe9t\xe9".decode("utf-8", "surrogateescape"))]
    upstream.send_once("http", *server, "/ok", headers, b"{}")
    _path, seen, _body = Handler.seen[-1]  # http.server decodes header bytes as latin-1
    assert seen["X-Note"].encode("latin-1") == "price \u20ac, caf\u00e9".encode()
    assert seen["X-Raw"].encode("latin-1") == b"\xe9t\xe9"


def test_a_write_that_cannot_be_written_as_http_is_not_sent_and_sg_is_not_down(server: tuple[str, int]) -> None:
    state = write_state("create")

    async def test(writes: Writes, outages: Outages) -> Any:
        request = Outgoing("http", *server, "/api3/json?caf\u00e9", [("Content-Type", "application/json")], b"{}")
        return await writes.send(Replica(), request, state, None), outages

    answer, outages = run_writes(test)
    assert isinstance(answer, Answer) and answer.reason == "unsendable"
    assert "create was not sent" in json.loads(answer.body)["message"]
    assert not Handler.seen and not outages.down_until


def test_not_sent_and_outcome_unknown_are_told_apart(server: tuple[str, int]) -> None:
    with pytest.raises(upstream.NotSent):
        upstream.send_once("http", "127.0.0.1", closed_port(), "/ok", [], b"{}")
    with pytest.raises(upstream.OutcomeUnknown):
        upstream.send_once("http", *server, "/drop", [], b"{}")
    assert Handler.seen[-1][0] == "/drop"  # it was sent: it may have been applied


def test_writes_reuse_kept_connections_and_never_resend(server: tuple[str, int]) -> None:
    pool = upstream.Pool()
    for _ in range(3):
        assert upstream.send_once("http", *server, "/keep", [], b"{}", pool=pool).status == 200
    assert Handler.connections == 1 and pool.made == 1 and len(Handler.seen) == 3
    # a kept connection lost after the request was written: outcome unknown, sent once, not retried
    with pytest.raises(upstream.OutcomeUnknown):
        upstream.send_once("http", *server, "/drop", [], b"{}", pool=pool)
    assert [path for path, _h, _b in Handler.seen].count("/drop") == 1 and Handler.connections == 1
    # an answer that closes the connection leaves nothing kept: the next write opens a new one
    upstream.send_once("http", *server, "/ok", [], b"{}", pool=pool)
    upstream.send_once("http", *server, "/keep", [], b"{}", pool=pool)
    assert Handler.connections == 3 and pool.made == 3


def test_a_kept_connection_the_server_closed_is_not_written_on(server: tuple[str, int]) -> None:
    pool = upstream.Pool()
    upstream.send_once("http", *server, "/keep-then-close", [], b"{}", pool=pool)
    assert Handler.closed.wait(10)  # on loopback the close has reached the kept socket
    reply = upstream.send_once("http", *server, "/keep", [], b'{"n": 2}', pool=pool)
    assert reply.status == 200 and pool.made == 2 and Handler.connections == 2
    assert [body for _p, _h, body in Handler.seen].count(b'{"n": 2}') == 1


def test_kept_connections_expire_and_are_bounded() -> None:
    now = [0.0]
    pool = upstream.Pool(size=1, idle_seconds=5.0, clock=lambda: now[0])
    a, b = FakeConnection(), FakeConnection()
    pool.give(("http", "sg", 80, None), a)
    pool.give(("http", "sg", 80, None), b)  # over the size: closed
    assert b.closed and not a.closed
    assert pool.take(("http", "other", 80, None)) is None
    now[0] = 5.0  # too old: closed, not used
    assert pool.take(("http", "sg", 80, None)) is None and a.closed


class FakeConnection:
    sock = None

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_post_json_reads_with_the_same_client(server: tuple[str, int]) -> None:
    host, port = server
    reply = upstream.post_json(f"http://{host}:{port}/ok?x=1", {"method_name": "read"})
    assert reply["echo"] == {"method_name": "read"}
    path, seen, _body = Handler.seen[-1]
    assert path == "/ok?x=1" and seen["User-Agent"].startswith("sgcache/")
    with pytest.raises(upstream.BadStatus):
        upstream.post_json(f"http://{host}:{port}/error", {})
    with pytest.raises(upstream.OutcomeUnknown):  # a read bounded by its own timeout, not a write's
        upstream.post_json(f"http://{host}:{port}/slow", {}, timeout=0.2)
    with pytest.raises(upstream.NotSent):
        upstream.post_json(f"http://127.0.0.1:{closed_port()}/api3/json", {})


def test_tls_is_checked_as_mitmproxy_checks_sg() -> None:
    assert upstream.tls_context(True, None).verify_mode == ssl.CERT_NONE
    strict = upstream.tls_context(False, None)
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname


class FakeService:
    """What Writes asks of the replica's service."""

    read_budget = 0.5

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.to_fetch: list[tuple[str, int]] = []
        self.learn_error: Exception | None = None

    def write_mark(self) -> int:
        return 42

    def outcome_unknown(self, method: str, args: Any) -> None:
        self.calls.append(("outcome_unknown", method, args))

    def learn(self, method: str, args: Any, results: Any, mark: Any) -> list[tuple[str, int]]:
        self.calls.append(("learn", method, args, results, mark))
        if self.learn_error is not None:
            raise self.learn_error
        return self.to_fetch

    def fetch_rows(self, url: str, auth: Any, items: Any, tls: Any) -> None:
        self.calls.append(("fetch_rows", url, auth, items, tls))

    def left_queued(self, entity_types: Any) -> None:
        self.calls.append(("left_queued", sorted(entity_types)))

    def count(self, reason: str | None) -> None:
        self.calls.append(("count", reason))


def run_writes(test: Any) -> Any:
    async def main() -> Any:
        with ThreadPoolExecutor(2) as executor, ThreadPoolExecutor(2) as write_executor:
            outages = Outages()
            return await test(Writes(executor, write_executor, outages), outages)

    return asyncio.run(main())


def write_state(method: str = "update") -> Any:
    state = state_of({})
    state.method, state.auth, state.args = method, AUTH, {"type": "Shot", "id": 1, "fields": []}
    return state


def test_a_write_is_sent_once_with_the_ingester_mark(server: tuple[str, int]) -> None:
    service = FakeService()
    replica = Replica()
    replica.service = service  # type: ignore[assignment]
    state = write_state()

    async def test(writes: Writes, outages: Outages) -> Any:
        request = Outgoing("http", *server, "/ok", [("Content-Type", "application/json")], b"{}")
        return await writes.send(replica, request, state, None)

    reply = run_writes(test)
    assert isinstance(reply, upstream.Reply) and reply.status == 200
    assert state.write_mark == 42 and len(Handler.seen) == 1


def test_a_write_that_cannot_be_sent_means_sg_is_down() -> None:
    state = write_state("create")

    async def test(writes: Writes, outages: Outages) -> Any:
        request = Outgoing("http", "127.0.0.1", closed_port(), "/api3/json", [], b"{}")
        answer = await writes.send(Replica(), request, state, None)  # no replica: no mark
        return answer, outages

    answer, outages = run_writes(test)
    assert isinstance(answer, Answer) and answer.headers[HEADER] == "pass; reason=sg-unreachable"
    assert "create was not sent" in json.loads(answer.body)["message"]
    assert "127.0.0.1" in outages.down_until and state.write_mark is None


def test_a_lost_answer_is_an_error_no_client_resends(server: tuple[str, int]) -> None:
    service = FakeService()
    replica = Replica()
    replica.service = service  # type: ignore[assignment]
    state = write_state()

    async def test(writes: Writes, outages: Outages) -> Any:
        request = Outgoing("http", *server, "/drop", [], b"{}")
        return await writes.send(replica, request, state, None), outages

    answer, outages = run_writes(test)
    assert isinstance(answer, Answer) and answer.status == 200 and answer.reason == "outcome-unknown"
    assert "may have been applied" in json.loads(answer.body)["message"]
    assert ("outcome_unknown", "update", state.args) in service.calls  # its effects are unknown: pending
    assert not outages.down_until  # SG took the write: it is not down


    closed = Replica()  # no replica open: the write is kept for the one that opens next

    async def unopened(writes: Writes, outages: Outages) -> Any:
        return await writes.send(closed, Outgoing("http", *server, "/drop", [], b"{}"), state, None)

    assert run_writes(unopened).reason == "outcome-unknown"
    assert closed._unrecorded == [("update", state.args)]


def test_learning_reads_back_a_partial_answer_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    service = FakeService()
    service.to_fetch = [("Shot", 1)]
    state = write_state()
    state.write_mark = 7
    tls = ssl.create_default_context()

    async def test(writes: Writes, outages: Outages) -> None:
        writes.may_read_back = lambda auth: auth == AUTH
        await writes.learn(service, state, {"type": "Shot", "id": 1}, "https://sg:443/api3/json", lambda: tls)
        service.learn_error = Passthrough("db-backoff")
        await writes.learn(service, state, {}, "https://sg:443/api3/json", lambda: tls)
        service.learn_error = RuntimeError("boom")
        await writes.learn(service, state, {}, "https://sg:443/api3/json", lambda: tls)

    with caplog.at_level(logging.INFO, logger="sgcache"):
        run_writes(test)
    assert service.calls[0] == ("learn", "update", state.args, {"type": "Shot", "id": 1}, 7)
    assert service.calls[1] == ("fetch_rows", "https://sg:443/api3/json", AUTH, [("Shot", 1)], tls)
    assert caplog.text.count("not recorded") == 2 and "db-backoff" in caplog.text


def test_a_partial_answer_to_credentials_the_cache_does_not_serve_is_not_read_back() -> None:
    """The read-back stores rows for every reader; SG may hide fields from a writer whose reads the
    cache does not serve (a human user, a script not listed): their rows are left to the ingester's
    fetch, and their types marked."""
    service = FakeService()
    service.to_fetch = [("Shot", 1), ("Asset", 2)]
    state = write_state()

    async def test(writes: Writes, outages: Outages) -> None:
        writes.may_read_back = lambda auth: False
        await writes.learn(service, state, {"type": "Shot", "id": 1}, "https://sg:443/api3/json",
                           ssl.create_default_context)

    run_writes(test)
    assert [c[0] for c in service.calls] == ["learn", "left_queued"]
    assert service.calls[1] == ("left_queued", ["Asset", "Shot"])


def test_a_database_step_is_waited_for_at_most_its_bound() -> None:
    """A step still running when the bound passes goes on in its thread (``started``); one still
    queued behind it is cancelled and never runs."""
    import threading
    import time

    from cache.proxy.dbwait import BoundedSteps, DatabaseWait

    steps = BoundedSteps(1, "test-step")
    release = threading.Event()
    ran: list[str] = []
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseWait) as hung:
            steps.run(0.2, lambda: ran.append("hung") or release.wait(30))
        with pytest.raises(DatabaseWait) as queued:
            steps.run(0.2, lambda: ran.append("queued"))
        assert time.monotonic() - started < 5
        assert hung.value.started and not queued.value.started
        release.set()
        assert steps.run(5, lambda: "done") == "done"
        assert ran == ["hung"]  # the queued step never ran
        assert steps.run(0, lambda: "no bound") == "no bound"
    finally:
        release.set()
        steps.close()
