"""cache/proxy's request path without a proxy: SiteCalls with a fake replica service, reads within
bounds, the replica opened fail-open, the relay guard. Plain objects, no mitmproxy, no mitmdump."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cache.errors import Passthrough
from cache.proxy import reads as readsmod
from cache.proxy.answers import HEADER, Answer
from cache.proxy.calls import BIG_BODY, Call, SGAnswer, SiteCalls
from cache.proxy.flowstate import FlowState, state_of
from cache.proxy.guard import RelayGuard
from cache.proxy.inline import InlineReads
from cache.proxy.reads import SLOW_CLIENT_FRACTION, Reads, SlowClients
from cache.proxy.relay import RelayPolicy
from cache.proxy.replica import Refused, Replica, ReplicaOptions
from cache.proxy.sending import Outgoing
from cache.replica import pending
from cache.replica.site import Site

from .paths import BASIC_SCHEMA

HOST = "sg.example.com"
AUTH = {"script_name": "pipeline", "script_key": "k"}
ENTITIES = {"entities": [{"type": "Shot", "id": 1}], "paging_info": {"entity_count": 1}}


class FakeService:
    """The replica service as SiteCalls and Reads use it."""

    read_budget = 1.0
    inline = InlineReads(None)  # no inline reads: every read goes to a worker

    def __init__(self) -> None:
        self.reads: list[tuple[Any, bool, float | None]] = []
        self.counted: list[str | None] = []
        self.learnt: list[tuple[Any, ...]] = []
        self.read_error: Exception | None = None
        self.read_delay = 0.0
        self.timeouts = 0

    def read(self, args: Any, allow_stale: bool = False, budget: float | None = None) -> Any:
        self.reads.append((args, allow_stale, budget))
        time.sleep(self.read_delay)
        if self.read_error is not None:
            raise self.read_error
        return ENTITIES

    def count(self, reason: str | None) -> None:
        self.counted.append(reason)

    def note_timeout(self) -> None:
        self.timeouts += 1

    def info(self) -> dict[str, Any]:
        return {"version": "test", "hits": 0}

    def write_mark(self) -> int:
        return 1

    def learn(self, *args: Any) -> list[Any]:
        self.learnt.append(args)
        return []


@pytest.fixture
def service() -> FakeService:
    return FakeService()


def run(service: FakeService, test: Any) -> Any:
    """``test(calls)`` with SiteCalls over a replica whose service is ``service``."""

    async def main() -> Any:
        with ThreadPoolExecutor(2) as executor, ThreadPoolExecutor(2) as write_executor:
            replica = Replica()
            replica.service = service  # type: ignore[assignment]
            calls = SiteCalls(replica, executor, write_executor, lambda: None, lambda: None)  # type: ignore[arg-type,return-value]
            return await test(calls)

    return asyncio.run(main())


def call(method: str, args: Any = None, auth: Any = AUTH, headers: list[tuple[str, str]] | None = None,
         body: bytes | None = None) -> Call:
    if body is None:
        body = json.dumps({"method_name": method, "params": [auth, args] if args is not None else [auth]}).encode()
    return Call(Outgoing("https", HOST, 443, "/api3/json", headers or [], body), client="client-1")


def accept(calls: SiteCalls, auth: Any = AUTH) -> None:
    """SG accepted ``auth`` at the site (as its answer to a read would say)."""
    calls.credentials.observe("read", call("read").site, auth, {"results": []})


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (call("read", {"type": "Shot"}, headers=[("Content-Encoding", "gzip")]), "content-encoding"),
        (call("read", body=b"{not json"), "not-api3"),
        (call("schema_read", {}), "method"),
        (call("read", {"type": "Shot"}), "auth-unverified"),
        (call("read", {"type": "Shot"}, auth={"user_login": "u", "user_password": "p"}), "user-auth"),
    ],
)
def test_calls_that_pass_say_why(service: FakeService, request_: Call, reason: str) -> None:
    state = state_of({})
    assert run(service, lambda calls: calls.request(request_, state)) is None
    assert state.pass_reason == reason and not state.answered_here
    assert service.reads == [] and service.counted == [reason]


def test_a_read_with_accepted_credentials_is_a_hit(service: FakeService) -> None:
    state = state_of({})

    async def test(calls: SiteCalls) -> Any:
        accept(calls)
        return await calls.request(call("read", {"type": "Shot"}), state)

    answer = run(service, test)
    assert isinstance(answer, Answer) and answer.headers[HEADER] == "hit"
    assert json.loads(answer.body) == {"results": ENTITIES}
    assert state.answered_here and state.pass_reason is None and state.method == "read"
    assert service.counted == [None] and service.reads == [({"type": "Shot"}, False, None)]


def test_a_big_body_is_decoded_too(service: FakeService) -> None:
    args = {"type": "Shot", "filters": {"logical_operator": "and", "conditions": []}, "pad": "x" * BIG_BODY}
    state = state_of({})

    async def test(calls: SiteCalls) -> Any:
        accept(calls)
        return await calls.request(call("read", args), state)

    assert isinstance(run(service, test), Answer) and service.reads[0][0] == args


def test_the_replica_s_reason_passes_the_read(service: FakeService) -> None:
    service.read_error = Passthrough("uncached-field", "Shot.sg_secret")
    state = state_of({})

    async def test(calls: SiteCalls) -> Any:
        accept(calls)
        return await calls.request(call("read", {"type": "Shot"}), state)

    assert run(service, test) is None and state.pass_reason == "uncached-field"


def test_no_replica_passes_everything() -> None:
    async def main() -> tuple[Any, FlowState]:
        with ThreadPoolExecutor(1) as executor:
            replica = Replica()  # nothing to open: no options
            calls = SiteCalls(replica, executor, executor, lambda: None, lambda: None)  # type: ignore[arg-type,return-value]
            accept(calls)
            state = state_of({})
            return await calls.request(call("read", {"type": "Shot"}), state), state

    outcome, state = asyncio.run(main())
    assert outcome is None and state.pass_reason == "no-replica"


def test_while_sg_is_down_the_proxy_answers_everything_itself(service: FakeService) -> None:
    async def test(calls: SiteCalls) -> list[Any]:
        calls.outages.note(HOST, "connection refused")
        calls.infos.add_sgcache(HOST, {"version": [8, 0, 0]}, {})
        accept(calls)
        stranger = {"script_name": "eve", "script_key": "guess"}
        out = []
        for request_ in (call("read", {"type": "Shot"}), call("read", {"type": "Shot"}, auth=stranger),
                         call("info"), call("create", {"type": "Shot", "fields": []})):
            state = state_of({})
            out.append((await calls.request(request_, state), state))
        return out

    (read, read_state), (stranger, _), (info, _), (create, create_state) = run(service, test)
    assert read.headers[HEADER] == "hit; stale" and service.reads[0][1] is True  # stale data allowed
    assert stranger.headers[HEADER] == "pass; reason=sg-unreachable"  # only credentials SG accepted before
    assert info.headers[HEADER] == "hit; stale" and json.loads(info.body)["sgcache"]["offline"] is True
    assert create.headers[HEADER] == "pass; reason=sg-unreachable" and create_state.answered_here
    assert "create was not sent" in json.loads(create.body)["message"]
    assert read_state.answered_here and service.counted.count("sg-unreachable") == 2


def test_offline_answers_can_be_turned_off(service: FakeService) -> None:
    state = state_of({})

    async def test(calls: SiteCalls) -> Any:
        calls.offline = False
        calls.outages.note(HOST, "connection refused")
        return await calls.request(call("schema_read", {}), state)

    assert run(service, test) is None and state.pass_reason == "method"  # SG is tried


def sg_answer(status: int, body: bytes = b'{"results": []}', content_type: str = "application/json") -> SGAnswer:
    return SGAnswer(status, lambda: body, content_type, replayed=False, server_connected=True)


def passed(method: str, args: Any = None) -> FlowState:
    state = state_of({})
    state.method, state.auth, state.args, state.pass_reason = method, AUTH, args, "auth-unverified"
    return state


def test_a_503_is_answered_stale_and_means_sg_is_down_once_three_connections_got_one(service: FakeService) -> None:
    async def test(calls: SiteCalls) -> Any:
        accept(calls)
        outcomes, down = [], []
        for client in ("c1", "c1", "c2", "c3"):
            read = dataclasses.replace(call("read"), client=client)
            outcomes.append(await calls.answer(read, passed("read", {"type": "Shot"}), sg_answer(503, b"maint")))
            down.append(HOST in calls.outages.down_until)
        return outcomes, down

    outcomes, down = run(service, test)
    assert all(isinstance(o, Answer) and o.headers[HEADER] == "hit; stale" for o in outcomes)  # each read, offline
    assert down == [False, False, False, True]  # one connection's 503s are its own; three: SG is down


def test_sg_s_answers_teach(service: FakeService) -> None:
    async def test(calls: SiteCalls) -> Any:
        read = await calls.answer(call("read"), passed("read", {"type": "Shot"}), sg_answer(200))
        verified = calls.credentials.reason(call("read").site, AUTH) is None
        info = await calls.answer(call("info"), passed("info"), sg_answer(200, b'{"version": [8, 0, 0]}'))
        write = passed("update", {"type": "Shot", "id": 1, "fields": []})
        write.write_mark = 5
        learnt = await calls.answer(call("update"), write, sg_answer(200, b'{"results": {"type": "Shot", "id": 1}}'))
        undecoded = state_of({})
        undecoded.pass_reason = "not-api3"
        return read, verified, info, learnt, await calls.answer(call("read"), undecoded, sg_answer(200))

    read, verified, info, learnt, undecoded = run(service, test)
    assert read is None and verified  # SG's success verified the credential at this site
    assert json.loads(info)["sgcache"]["version"] == "test"  # info gains the sgcache key
    assert learnt is None and service.learnt == [
        ("update", {"type": "Shot", "id": 1, "fields": []}, {"type": "Shot", "id": 1}, 5)]
    assert undecoded is None


def test_a_connection_never_made_is_an_outage(service: FakeService) -> None:
    async def test(calls: SiteCalls) -> Any:
        dropped = passed("read")
        calls.connection_failed(dropped, HOST, "server closed connection", never_connected=False)
        first = dict(calls.outages.down_until)
        calls.connection_failed(state_of({}), HOST, "refused", never_connected=True)  # not decoded: not ours
        second = dict(calls.outages.down_until)
        calls.connection_failed(dropped, HOST, "refused", never_connected=True)
        return first, second, dict(calls.outages.down_until)

    first, second, third = run(service, test)
    assert not first and not second and HOST in third


def test_reads_that_never_got_a_worker_are_busy_not_a_database_failure(
        service: FakeService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readsmod, "READ_TIMEOUT", 0.2)
    release = threading.Event()

    async def main() -> tuple[Any, Any]:
        with ThreadPoolExecutor(1) as executor:
            executor.submit(release.wait, 5)  # the only worker is taken
            reads = Reads(executor)
            busy = await reads.answer(service, {"type": "Shot"}, "c")  # type: ignore[arg-type]
            release.set()
            service.read_delay = 0.5
            slow = await reads.answer(service, {"type": "Shot"}, "c")  # type: ignore[arg-type]
            return busy, slow

    busy, slow = asyncio.run(main())
    assert busy == "busy" and slow == "db-timeout" and service.timeouts == 1


def test_a_connection_whose_read_overran_gets_a_smaller_budget(service: FakeService) -> None:
    async def main() -> tuple[Any, Any, Reads]:
        with ThreadPoolExecutor(1) as executor:
            reads = Reads(executor)
            service.read_error = Passthrough("slow-read", "over budget")
            first = await reads.answer(service, {"type": "Shot"}, "slow-conn")  # type: ignore[arg-type]
            service.read_error = None
            second = await reads.answer(service, {"type": "Shot"}, "slow-conn")  # type: ignore[arg-type]
            await reads.answer(service, {"type": "Shot"}, "other-conn")  # type: ignore[arg-type]
            return first, second, reads

    first, second, reads = asyncio.run(main())
    assert first == "slow-read" and isinstance(second, Answer)
    assert [budget for _args, _stale, budget in service.reads] == [None, service.read_budget * SLOW_CLIENT_FRACTION,
                                                                   None]
    assert list(reads.slow_clients.until) == ["slow-conn"]


def test_slow_clients_are_forgotten_after_a_while() -> None:
    now = [0.0]
    slow = SlowClients(clock=lambda: now[0])
    slow.note("c")
    assert slow.budget("c", 2.0) == pytest.approx(0.2) and slow.budget("d", 2.0) is None
    assert slow.budget("c", 0.01) == pytest.approx(0.01)  # never below the minimum (or the budget)
    now[0] = readsmod.SLOW_CLIENT_SECONDS + 1
    assert slow.budget("c", 2.0) is None


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'replica.db'}"


def test_the_replica_fails_open_and_refuses_the_operator_s_mistakes(sqlite_url: str, tmp_path: Path) -> None:
    site = Site.parse("https://sg.example.com")
    replica = Replica()
    unopenable = ReplicaOptions(f"sqlite:///{tmp_path / 'no-such-dir' / 'r.db'}", str(BASIC_SCHEMA), 0, 0)
    replica.configure_site("https://sg.example.com")
    replica.reopen(unopenable)  # the database is down: the proxy runs and passes everything
    assert replica.service is None and replica.site == site

    async def retry() -> Any:
        with ThreadPoolExecutor(1) as executor:
            return await replica.current(executor)  # backing off: not tried again yet

    assert asyncio.run(retry()) is None
    with pytest.raises(Refused):
        replica.reopen(ReplicaOptions(sqlite_url, str(tmp_path / "missing.yml"), 0, 0))
    good = ReplicaOptions(sqlite_url, str(BASIC_SCHEMA), 0, 0)
    replica.reopen(good)
    assert replica.service is not None and replica.site == site
    replica.configure_site("")
    assert replica.site is None
    replica.reopen(good)  # no site configured: the replica's own is served
    assert replica.site == site
    replica.configure_site("https://other.example.com")
    with pytest.raises(Refused, match="sg.example.com"):
        replica.reopen(good)
    assert replica.service is None
    replica.close()



def test_a_replica_that_cannot_be_opened_is_logged_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """SQLAlchemy's error quotes the whole statement over many lines (a PostgreSQL URL naming a
    schema that does not exist fails on the first CREATE TABLE); the proxy retries every few
    seconds, so its warning keeps the database's first line, and no password."""
    import sqlalchemy.exc

    from cache.proxy import replica as replicamod

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise sqlalchemy.exc.ProgrammingError(
            "\nCREATE TABLE sgcache_state (\n\tkey VARCHAR(64) NOT NULL\n)\n", {},
            Exception("no schema has been selected to create in\nLINE 2: CREATE TABLE sgcache_state (\n"))

    monkeypatch.setattr(replicamod, "CacheService", refuse)
    replica = Replica()
    replica.configure_site("https://sg.example.com")
    with caplog.at_level("WARNING", logger="sgcache"):
        replica.reopen(ReplicaOptions("postgresql://cache:pw-Zq81x@db.example/sg?options=-csearch_path%3Dnosuch",
                                      str(BASIC_SCHEMA), 0, 0))
    assert replica.service is None
    [record] = [r for r in caplog.records if "cannot open the replica" in r.getMessage()]
    message = record.getMessage()
    assert "\n" not in message and "CREATE TABLE" not in message, message
    assert "ProgrammingError: no schema has been selected to create in" in message
    assert "Zq81x" not in message and "cache:***@db.example" in message

def test_a_write_answered_while_no_replica_is_open_is_marked_once_one_opens(tmp_path: Path) -> None:
    """SG took a write while the replica's database could not be opened: the service that opens
    later marks what the write could have changed before it serves a read."""
    replica = Replica()
    replica.configure_site(f"https://{HOST}")
    url = f"sqlite:///{tmp_path / 'replica.db'}"
    replica.reopen(ReplicaOptions(f"sqlite:///{tmp_path / 'no-such-dir' / 'r.db'}", str(BASIC_SCHEMA), 0, 0))
    assert replica.service is None
    write = passed("update", {"type": "Shot", "id": 1, "fields": [{"field_name": "code", "value": "new"}]})

    async def main() -> Any:
        with ThreadPoolExecutor(1) as executor:
            calls = SiteCalls(replica, executor, executor, lambda: None, lambda: None)  # type: ignore[arg-type,return-value]
            return await calls.answer(call("update"), write, sg_answer(200, b'{"results": {"type": "Shot", "id": 1}}'))

    assert asyncio.run(main()) is None
    replica.reopen(ReplicaOptions(url, str(BASIC_SCHEMA), 0, 0))  # the database is back
    service = replica.service
    assert service is not None
    with pytest.raises(Passthrough):
        service.read({"type": "Shot", "return_fields": ["code"], "filters": {"logical_operator": "and", "conditions": []},
                      "return_only": "active", "paging": {"entities_per_page": 1, "current_page": 1}})
    with service.store.engine.connect() as conn:
        standing = pending.active(conn, service.store.pending)
    assert ("Shot", "code") in standing and ("Shot", pending.WHOLE_TYPE) not in standing  # what it sent
    replica.close()


def test_the_guard_refuses_with_a_reason_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    import ipaddress

    counted: list[str] = []
    site = Site.parse("https://sg.example.com")

    def resolve(name: str) -> list[Any]:
        return [ipaddress.ip_address("127.0.0.1" if name == "evil.test" else "93.184.216.34")]

    async def main() -> list[Any]:
        with ThreadPoolExecutor(1) as executor:
            guard = RelayGuard(executor, counted.append)
            guard.policy = RelayPolicy(site, ["db.studio.internal:5432"], resolver=resolve, own=lambda _a: False)
            state = state_of({})
            return [
                await guard.connect("sg.example.com", 443, "10.0.0.9", state_of({})),
                await guard.connect("files.example.org", 443, "10.0.0.9", state_of({})),
                await guard.connect("evil.test", 443, "10.0.0.9", state),
                state,
                await guard.request("GET", "http", "files.example.org", 8080, "10.0.0.9", state_of({})),
                await guard.upstream("db.studio.internal", 5432, tls=False),
                await guard.upstream("127.0.0.1", 22, tls=False),
                guard.peer_refused("files.example.org", 443, "127.0.0.1"),
                guard.peer_refused("db.studio.internal", 5432, "127.0.0.1"),
            ]

    site_ok, public_ok, local, state, plain, allowed, refused, rebound, named = asyncio.run(main())
    assert site_ok is None and public_ok is None and allowed is None
    assert local.status == 403 and b"local address" in local.body and "local address" in state.refused
    assert plain.status == 403 and b"port 8080" in plain.body
    assert refused.startswith("sgcache: 127.0.0.1:22 refused")
    assert rebound is True and named is False  # a glob names it: the operator allowed it
    assert counted == ["relay-refused", "relay-refused"]
    assert "refused CONNECT evil.test:443 from 10.0.0.9" in caplog.text



def test_partial_answers_are_read_back_only_with_credentials_the_cache_serves(service: FakeService) -> None:
    """The read-back after a partial answer stores rows for every reader: only with a credential
    whose reads the cache would serve (SG may hide fields from the others), as the options say now."""
    from cache.proxy.auth import CredentialCache

    async def test(calls: SiteCalls) -> Any:
        user = {"user_login": "ann", "user_password": "pw"}
        may = calls.writes.may_read_back
        before = (may(AUTH), may(user))
        calls.credentials = CredentialCache(allow_users=True, scripts=["other"])  # the options changed
        return before, (may(AUTH), may(user))

    before, after = run(service, test)
    assert before == (True, False) and after == (False, True)
