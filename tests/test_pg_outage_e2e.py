"""The replica's PostgreSQL goes away and comes back while real processes run: mitmdump with the
project's addon and ``scripts/ingest-events``, real shotgun_api3 clients, the fake SG.

The shared PostgreSQL server is never stopped: each process reaches it through a TCP relay owned by
the test (tests/test_failopen.py's :class:`TcpRelay`), and cutting the relay (listener and every
relayed socket) is the outage; or the test ends its own ingester's backends
(``pg_terminate_backend``, found by an ``application_name`` only this test uses).

What a user must see (docs/running.md "When things go wrong", docs/semantics.md "Known limits"):
during the outage reads get SG's answers (``pass; reason=db-...``) and writes are sent once and
answered; afterwards the proxy hits again without a restart, a write made through it during the
outage is never read stale, and the ingester (still running, or restarted) applies every event
exactly once. SIGTERM ends an ingester whose database hangs (a vanished host looks so) within
seconds, and the next one resumes.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cache.replica.dialect import normalize_url
from cache.replica.statekeys import EVENT_CURSOR as K_CURSOR

from .fakesg import FakeSite
from .processes import ScriptProcess
from .replica import assert_equal_to_site
from .rig import READER, READER_KEY, Rig
from .test_failopen import QUERIES, ReadLoad, TcpRelay, direct_raw, raw_call, relayed_rig, relayed_url
from .test_ingest_e2e import assert_applied_once, workload
from .wait import wait_until

#: The ingester's options in these tests: quick polls, no idle back-off, short gaps.
INGEST_ARGS = ["--poll-interval", "0.2", "--idle-max", "0.2", "--gap-timeout", "2"]


@pytest.fixture
def pg_db_url(db_url: str, backend: str) -> str:
    if backend != "postgresql":
        pytest.skip("needs PostgreSQL (SGCACHE_TEST_DB): the outage is a relay cut or ended backends")
    return db_url


@contextlib.contextmanager
def relay_to(db_url: str) -> Iterator[TcpRelay]:
    parts = urllib.parse.urlsplit(db_url)
    relay = TcpRelay((parts.hostname or "127.0.0.1", parts.port or 5432)).start()
    try:
        yield relay
    finally:
        relay.resume()
        relay.close()


def start_ingester(rig: Rig, db_url: str, *args: str) -> ScriptProcess:
    """``scripts/ingest-events`` on ``db_url`` (a relay, or a URL naming an application), stopped with the rig."""
    log = rig.workdir / f"ingest-{len(rig.ingesters)}.log"
    proc = ScriptProcess("ingest-events", [*INGEST_ARGS, *args], rig.env(SGCACHE_DB=db_url), log)
    rig.ingesters.append(proc)
    rig.ingester = rig.ingester or proc
    return proc


def with_application_name(db_url: str, name: str) -> str:
    sep = "&" if "?" in db_url else "?"
    return f"{db_url}{sep}application_name={name}"


def id_read(entity_type: str, entity_id: int, fields: list[str]) -> dict[str, Any]:
    """An API3 read of one entity by id (the raw arguments: the proxy's header tells hit from pass)."""
    return {"type": entity_type, "return_fields": fields, "return_only": "active",
            "filters": {"logical_operator": "and",
                        "conditions": [{"path": "id", "relation": "is", "values": [entity_id]}]},
            "paging": {"entities_per_page": 500, "current_page": 1}, "return_paging_info": False}


def cut_value(reply: Any) -> Any:
    """``sg_cut_in`` of the one entity a :func:`id_read` reply holds."""
    entities = reply["results"]["entities"]
    assert len(entities) == 1, reply
    return entities[0]["sg_cut_in"]


def wait_for_own_write_hit(rig: Rig, proxy: Any, args: dict[str, Any], value: int, what: str,
                           timeout: float = 20, pause: float = 0.1) -> None:
    """Read ``args`` (one Shot) through the proxy until it is a hit; every answer meanwhile, passed or
    not, must be the proxy's own write of ``sg_cut_in`` = ``value``."""
    seen: list[str] = []

    def hit_and_right() -> bool:
        header, reply = raw_call(rig, "read", args)
        seen.append(header)
        assert cut_value(reply) == value, f"the proxy's own write read stale: {header} {reply}"
        return header == "hit"

    wait_until(hit_and_right, timeout, what, pause=pause, detail=lambda: f"{seen[-5:]}\n{proxy.output()[-3000:]}")


def test_proxy_and_ingester_through_a_database_outage(tmp_path: Path, pg_db_url: str) -> None:
    """PostgreSQL goes away for the proxy and the ingester, comes back for the proxy first, then for
    the ingester: no wrong answer, no lost or doubled write, hits again without a restart."""
    rig = Rig(tmp_path, pg_db_url, proxy=False)
    site = rig.site
    site.add_script(READER, READER_KEY)  # before the scan: the replica has it
    with relay_to(pg_db_url) as proxy_relay, relay_to(pg_db_url) as ingest_relay, rig:
        scanned = rig.state(K_CURSOR)
        ingester = start_ingester(rig, relayed_url(pg_db_url, ingest_relay.port))
        # a generous max_lag: while the ingester is away the proxy still serves hits, so its own write
        # made during the outage is read from the replica unless the proxy marked it pending
        proxy = rig.start_proxy(["sgcache_max_lag=60"], db_url=relayed_url(pg_db_url, proxy_relay.port))
        reader = rig.client(script_name=READER, api_key=READER_KEY)
        reader.find_one("Project", [])  # SG accepts the reader: its reads may be hits
        writer = rig.client()
        writer.find_one("Project", [])
        rig.wait(rig.caught_up, what="the ingester's first catch-up")
        sh010 = QUERIES[0]
        rig.wait_hit(lambda: reader.find(*sh010), lambda got: got == rig.direct().find(*sh010))
        shot = site.find_direct("Shot", [["code", "is", "sh020"]], ["sg_cut_in"])[0]
        other = site.find_direct("Shot", [["code", "is", "sh030"]], ["sg_cut_in"])[0]
        args = id_read("Shot", shot["id"], ["sg_cut_in"])
        assert raw_call(rig, "read", args)[0] == "hit"

        with ReadLoad(rig) as load:  # another client, all along: always SG's answers
            load.run_for(0.3)
            proxy_relay.cut()
            ingest_relay.cut()
            # reads pass with a database reason and get SG's answer
            headers = [raw_call(rig, "read", args)[0] for _ in range(4)]
            assert all(h.startswith("pass; reason=db-") for h in headers), headers
            # a write through the proxy: sent once, answered
            updates = site.count("update")
            answer = writer.update("Shot", shot["id"], {"sg_cut_in": 4001})
            assert answer["sg_cut_in"] == 4001
            assert site.count("update") == updates + 1
            created = writer.create("Asset", {"code": "made through the proxy during the outage"})
            # and writes straight to SG
            site.update_direct("Shot", other["id"], {"sg_cut_in": 5001})
            site.create_direct("Asset", {"code": "made at SG during the outage"})
            header, reply = raw_call(rig, "read", args)
            assert header.startswith("pass; reason=db-"), header
            assert cut_value(reply) == 4001
            rig.wait(lambda: "database error" in ingester.output(), what="the ingester meeting the outage")
            load.run_for(1.0)
            during = rig.client().info()["sgcache"]["passes"]
            assert ingester.poll() is None, ingester.output()[-3000:]

            # the database is back for the proxy, not yet for the ingester: the replica has neither write
            proxy_relay.restore()
            seen: list[str] = []

            def replica_answers_again() -> bool:
                header, reply = raw_call(rig, "read", args)
                seen.append(header)
                assert cut_value(reply) == 4001, f"the proxy's own write read stale: {header} {reply}"
                return raw_call(rig, "read", id_read("Shot", other["id"], ["code"]))[0] == "hit"

            wait_until(replica_answers_again, 20, "the proxy reading the replica again", pause=0.1,
                       detail=lambda: f"{seen[-5:]}\n{proxy.output()[-3000:]}")
            for _ in range(5):  # the replica is back, the write not yet in it: still SG's answer
                header, reply = raw_call(rig, "read", args)
                seen.append(header)
                assert cut_value(reply) == 4001, f"the proxy's own write read stale: {header} {reply}"

            # the ingester's database is back: it catches up and the write is served from the replica
            ingest_relay.restore()
            rig.wait(rig.caught_up, timeout=30, what="the ingester catching up after the outage")

            wait_for_own_write_hit(rig, proxy, args, 4001, "the written shot served from the replica")
            load.run_for(0.5)
        assert not load.errors, load.errors[:5]
        assert any(reason.startswith("db-") for reason in during), during
        assert ingester.poll() is None, ingester.output()[-3000:]
        rig.wait_hit(lambda: reader.find(*sh010), lambda got: got == rig.direct().find(*sh010))
        rig.wait_hit(lambda: reader.find_one("Shot", [["id", "is", other["id"]]], ["sg_cut_in"]),
                     lambda got: got["sg_cut_in"] == 5001)
        rig.wait_hit(lambda: reader.find_one("Asset", [["id", "is", created["id"]]], ["code"]),
                     lambda got: got is not None and got["code"] == created["code"])
        assert direct_raw(rig, args) == raw_call(rig, "read", args)[1]
        assert_equal_to_site(rig.store, site)
        assert_applied_once(rig.store, site, since=scanned)
        assert "Traceback" not in proxy.output()


def pg_backends(admin: sa.Engine, application: str) -> list[int]:
    with admin.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :a"),
                                           {"a": application})]


def terminate(admin: sa.Engine, application: str) -> int:
    """End every backend of ``application`` (this test's processes only); how many were ended."""
    with admin.connect() as conn:
        return sum(bool(r[0]) for r in conn.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :a"),
            {"a": application}))


def test_ingester_backends_terminated_while_events_come(tmp_path: Path, pg_db_url: str) -> None:
    """The ingester's sessions are ended again and again while SG logs changes: it keeps running,
    takes the leadership again, and the replica ends equal to SG with every event applied once."""
    application = f"sgcache-test-{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(normalize_url(pg_db_url), isolation_level="AUTOCOMMIT")
    try:
        with Rig(tmp_path, pg_db_url, FakeSite.basic(), prime="direct", proxy=False) as rig:
            proc = start_ingester(rig, with_application_name(pg_db_url, application))
            # running, not starting: a start-up that cannot open the replica ends the process (a
            # service manager restarts it), and the primed replica counts as caught up at once
            rig.wait(lambda: "leader lock taken" in proc.output(), what="the ingester leading")
            rig.wait(rig.caught_up, what="the ingester's first catch-up")
            rng = random.Random(11)
            writer = threading.Thread(target=workload, args=(rig.site, random.Random(12), 250, 0.005))
            writer.start()
            ended = 0
            while writer.is_alive() or ended < 5:
                rig.wait(lambda: pg_backends(admin, application), timeout=20, what="the ingester connected again")
                time.sleep(rng.uniform(0.05, 0.4))  # a random point of its work
                ended += terminate(admin, application)
                assert proc.poll() is None, proc.output()[-3000:]
            writer.join()
            rig.wait(rig.caught_up, timeout=30, what="catch-up after the ended sessions")
            assert ended >= 5
            assert proc.poll() is None, proc.output()[-3000:]
            assert proc.output().count("leader lock taken") >= 2, proc.output()[-3000:]
            assert_equal_to_site(rig.store, rig.site)
            assert_applied_once(rig.store, rig.site)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, proc.output()[-3000:]
    finally:
        admin.dispose()


def test_ingester_stopped_during_an_outage_resumes_after_it(tmp_path: Path, pg_db_url: str) -> None:
    """SIGTERM while the database is away: the ingester exits 0 within seconds (its cursor unknown,
    said in its log); started again once the database is back, it applies what SG logged meanwhile."""
    with relay_to(pg_db_url) as relay, Rig(tmp_path, pg_db_url, FakeSite.basic(), prime="direct", proxy=False) as rig:
        url = relayed_url(pg_db_url, relay.port)
        first = start_ingester(rig, url)
        workload(rig.site, random.Random(21), 40)
        rig.wait(rig.caught_up, what="the first catch-up")
        relay.cut()
        workload(rig.site, random.Random(22), 40)
        rig.wait(lambda: "database error" in first.output() or "database unavailable" in first.output(),
                 what="the ingester meeting the outage")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0, first.output()[-3000:]
        assert "ingester stopping" in first.output()
        relay.restore()
        second = start_ingester(rig, url)
        rig.wait(rig.caught_up, timeout=30, what="catch-up by the restarted ingester")
        assert second.poll() is None, second.output()[-3000:]
        assert_equal_to_site(rig.store, rig.site)
        assert_applied_once(rig.store, rig.site)


class OwnWrites:
    """A client thread that updates shots through the proxy and reads each write back through it at
    once: the answer must be its own write, whatever the database does meanwhile."""

    def __init__(self, rig: Rig, shot_ids: list[int]) -> None:
        self.rig, self.shot_ids = rig, shot_ids
        self.writes = 0
        self.errors: list[str] = []
        self.headers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sg = self.rig.client()
        value = 7000
        while not self._stop.is_set():
            shot_id = self.shot_ids[value % len(self.shot_ids)]
            value += 1
            try:
                answer = sg.update("Shot", shot_id, {"sg_cut_in": value})
                if answer["sg_cut_in"] != value:
                    self.errors.append(f"update answered {answer!r}, wrote {value}")
                self.writes += 1
                header, reply = raw_call(self.rig, "read", id_read("Shot", shot_id, ["sg_cut_in"]))
                self.headers.append(header)
                if cut_value(reply) != value:
                    self.errors.append(f"Shot {shot_id}: read {cut_value(reply)} ({header}) after writing {value}")
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> OwnWrites:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_own_writes_read_right_across_repeated_outages(tmp_path: Path, pg_db_url: str) -> None:
    """A client writes and reads back through the proxy while the proxy's database goes away and
    comes back twice, at random points (the ingester's stays up): every write is sent once,
    every read-back is the write, hits come back after each outage, and the replica ends equal to SG."""
    rig = Rig(tmp_path, pg_db_url, proxy=False)
    rig.site.add_script(READER, READER_KEY)
    with relay_to(pg_db_url) as relay, rig:
        scanned = rig.state(K_CURSOR)
        ingester = start_ingester(rig, pg_db_url)
        proxy = rig.start_proxy([], db_url=relayed_url(pg_db_url, relay.port))
        reader = rig.client(script_name=READER, api_key=READER_KEY)
        reader.find_one("Project", [])
        rig.wait(rig.caught_up, what="the ingester's first catch-up")
        sh010 = QUERIES[0]
        rig.wait_hit(lambda: reader.find(*sh010), lambda got: got == rig.direct().find(*sh010))
        shots = [s["id"] for s in rig.site.find_direct("Shot", [["code", "in", ["sh020", "sh030", "sh040"]]], ["id"])]
        rng = random.Random(5)
        met = 0  # outages the proxy met (a database error logged during them)
        with OwnWrites(rig, shots) as writes:
            for _ in range(2):
                wait_until(lambda: writes.writes >= 2, 20, "writes through the proxy")
                time.sleep(rng.uniform(0.0, 0.3))  # a random point of a write or its read-back
                errors = proxy.output().count("database error")
                relay.cut()
                before = writes.writes
                wait_until(lambda b=before: writes.writes >= b + 3, 20, "writes during the outage",
                           detail=lambda: proxy.output()[-3000:])
                met += proxy.output().count("database error") > errors
                relay.restore()
                rig.wait_hit(lambda: reader.find(*sh010), lambda got: got == rig.direct().find(*sh010),
                             timeout=20)
        assert not writes.errors, writes.errors[:5]
        assert met == 2, f"the proxy met {met} of 2 outages"
        assert any(h.startswith("pass; reason=") for h in writes.headers), writes.headers  # kept writes passed
        updates = rig.site.count("update")
        assert updates == writes.writes, f"SG got {updates} updates for {writes.writes} sent"
        rig.wait(rig.caught_up, timeout=30, what="the final catch-up")
        for shot_id in shots:
            args = id_read("Shot", shot_id, ["sg_cut_in"])
            wait_until(lambda a=args: raw_call(rig, "read", a) == ("hit", direct_raw(rig, a)), 20,
                       "the written shots served from the replica, right", pause=0.1,
                       detail=lambda: proxy.output()[-3000:])
        assert ingester.poll() is None
        assert_equal_to_site(rig.store, rig.site)
        assert_applied_once(rig.store, rig.site, since=scanned)
        assert "Traceback" not in proxy.output()


def test_proxy_backends_terminated_then_hits_resume(tmp_path: Path, pg_db_url: str) -> None:
    """Every session of the proxy (pool, write path, the event loop's version questions) is ended by
    the server: reads keep SG's answers, a write is read back right, and hits come back by themselves."""
    application = f"sgcache-test-{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(normalize_url(pg_db_url), isolation_level="AUTOCOMMIT")
    try:
        with Rig(tmp_path, pg_db_url, proxy=False) as rig:
            start_ingester(rig, pg_db_url)  # clears the markers of the proxy's writes
            proxy = rig.start_proxy(["sgcache_max_lag=0"], db_url=with_application_name(pg_db_url, application))
            sg = rig.client()
            sg.find_one("Project", [])
            shot = rig.site.find_direct("Shot", [["code", "is", "sh020"]], ["id"])[0]
            args = id_read("Shot", shot["id"], ["sg_cut_in"])
            wait_until(lambda: raw_call(rig, "read", args)[0] == "hit", 20, "a first hit")
            with ReadLoad(rig) as load:
                for value in (8001, 8002, 8003):
                    load.run_for(0.3)
                    assert pg_backends(admin, application), "the proxy has no session to end"
                    ended = terminate(admin, application)
                    assert ended >= 1
                    assert sg.update("Shot", shot["id"], {"sg_cut_in": value})["sg_cut_in"] == value
                    assert cut_value(raw_call(rig, "read", args)[1]) == value
                    wait_until(lambda: raw_call(rig, "read", args) == ("hit", direct_raw(rig, args)), 20,
                               "hits after the ended sessions", pause=0.1, detail=lambda: proxy.output()[-3000:])
            assert not load.errors, load.errors[:5]
            assert "Traceback" not in proxy.output()
    finally:
        admin.dispose()


def test_ingester_whose_postgresql_hangs_still_exits_on_sigterm(tmp_path: Path, pg_db_url: str) -> None:
    """The database stops answering on open connections (a stalled relay, as a vanished host looks):
    SIGTERM still ends the ingester within seconds, and a new one resumes once the database answers."""
    with relay_to(pg_db_url) as relay, Rig(tmp_path, pg_db_url, FakeSite.basic(), prime="direct", proxy=False) as rig:
        url = relayed_url(pg_db_url, relay.port)
        first = start_ingester(rig, url)
        workload(rig.site, random.Random(31), 30)
        rig.wait(rig.caught_up, what="the first catch-up")
        relay.stall()
        workload(rig.site, random.Random(32), 30)
        time.sleep(1.0)  # not an assertion: lets the ingester's next poll meet the hung database
        first.send_signal(signal.SIGTERM)
        try:
            code = first.wait(timeout=15)
        except subprocess.TimeoutExpired:
            code = None
        relay.resume()
        assert code is not None, f"still running 15 s after SIGTERM:\n{first.output()[-3000:]}"
        assert code == 0, first.output()[-3000:]
        assert "ending the process" in first.output()  # the database hung: the stop needed the grace
        first.wait(timeout=10)
        second = start_ingester(rig, url)
        rig.wait(rig.caught_up, timeout=30, what="catch-up by the next ingester")
        assert second.poll() is None
        assert_equal_to_site(rig.store, rig.site)
        assert_applied_once(rig.store, rig.site)


def test_a_hung_database_is_left_alone_while_the_breaker_is_open(tmp_path: Path, pg_db_url: str) -> None:
    """The proxy's PostgreSQL stops answering (a stalled relay: how an unreachable host looks, each
    new connection waiting for its connect timeout): once the breaker is open, reads pass
    ``db-backoff`` without a new connection to the database each (only the breaker's probes and the
    event loop's retries connect), so they are answered at once, not after a connect timeout each."""
    with relayed_rig(tmp_path, pg_db_url) as (rig, relay):
        args = id_read("Shot", rig.site.find_direct("Shot", [["code", "is", "sh020"]], ["id"])[0]["id"], ["code"])
        raw_call(rig, "read", args)  # SG accepts the credentials
        wait_until(lambda: raw_call(rig, "read", args)[0] == "hit", 20, "a first hit")
        relay.stall()
        try:
            with ThreadPoolExecutor(3) as pool:  # three reads time out together: the breaker opens

                def breaker_open() -> bool:
                    got = list(pool.map(lambda _: raw_call(rig, "read", args)[0], range(3)))
                    return "pass; reason=db-backoff" in got

                wait_until(breaker_open, 60, "the breaker opening", pause=0.1,
                           detail=lambda: rig.proxy.output()[-3000:])
            before = relay.accepted
            headers = [raw_call(rig, "read", args) for _ in range(12)]
        finally:
            relay.resume()
        opened = relay.accepted - before
        expected = direct_raw(rig, args)
        assert all(reply == expected for _, reply in headers), headers
        backoff = sum(header == "pass; reason=db-backoff" for header, _ in headers)
        assert backoff >= 6, [header for header, _ in headers]
        assert opened < backoff, (f"{opened} connections to the hung database for {backoff} reads passed "
                                  f"db-backoff: {[header for header, _ in headers]}")
        wait_until(lambda: raw_call(rig, "read", args)[0] == "hit", 20, "hits after the database answers again",
                   pause=0.1, detail=lambda: rig.proxy.output()[-3000:])


def test_proxy_started_without_its_database_hits_once_it_comes(tmp_path: Path, pg_db_url: str) -> None:
    """mitmdump starts while its PostgreSQL cannot be reached (nothing listens at the relay's port):
    reads pass with SG's answers, a write is answered; once the database listens the proxy opens
    the replica by itself, never reads that write stale, and serves hits."""
    parts = urllib.parse.urlsplit(pg_db_url)
    relay = TcpRelay((parts.hostname or "127.0.0.1", parts.port or 5432))
    with socket.socket() as probe:  # a port nothing listens on (yet)
        probe.bind(("127.0.0.1", 0))
        relay.port = probe.getsockname()[1]
    rig = Rig(tmp_path, pg_db_url, proxy=False)
    rig.site.add_script(READER, READER_KEY)
    try:
        with rig:
            start_ingester(rig, pg_db_url)
            proxy = rig.start_proxy([], db_url=relayed_url(pg_db_url, relay.port))
            rig.wait(rig.caught_up, what="the ingester's first catch-up")
            shot = rig.site.find_direct("Shot", [["code", "is", "sh020"]], ["id"])[0]
            args = id_read("Shot", shot["id"], ["sg_cut_in"])
            raw_call(rig, "read", args)  # SG accepts the credentials
            header, reply = raw_call(rig, "read", args)
            assert header.startswith("pass; reason="), header
            assert reply == direct_raw(rig, args)
            sg = rig.client()
            assert sg.update("Shot", shot["id"], {"sg_cut_in": 6001})["sg_cut_in"] == 6001
            assert cut_value(raw_call(rig, "read", args)[1]) == 6001
            relay.start()
            wait_for_own_write_hit(rig, proxy, args, 6001, "hits once the database listens", timeout=30, pause=0.2)
            assert "cannot open the replica" in proxy.output()
            assert "Traceback" not in proxy.output()
    finally:
        relay.close()


class GhostRelay(TcpRelay):
    """A relay that can lose the client side of its connections while the server side lives on:
    :meth:`sever` resets every relayed connection towards its client, and keeps the sockets towards
    PostgreSQL open and silent, so the server never learns (a network path lost one way: the
    server's sessions, their locks with them, stay until its own keepalives end them, hours later)."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.ghosts: list[socket.socket] = []

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            if s not in self.ghosts:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, set()
            for s in socks:
                with suppress(OSError):
                    if s.getpeername()[1] == self.target[1]:
                        self.ghosts.append(s)
        for s in socks:
            if s not in self.ghosts:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        super().close()
        for s in self.ghosts:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_ingester_whose_lost_session_still_holds_the_lock_leads_again(tmp_path: Path, pg_db_url: str) -> None:
    """The ingester's connection breaks on its side while the server keeps the session (and the
    leader lock on it): the ingester must not wait for its own dead session for ever; it ends that
    session, leads again and catches up."""
    parts = urllib.parse.urlsplit(pg_db_url)
    relay = GhostRelay((parts.hostname or "127.0.0.1", parts.port or 5432)).start()
    try:
        with Rig(tmp_path, pg_db_url, FakeSite.basic(), prime="direct", proxy=False) as rig:
            proc = start_ingester(rig, relayed_url(pg_db_url, relay.port), "--lock-retry", "0.2")
            workload(rig.site, random.Random(41), 30)
            rig.wait(rig.caught_up, what="the first catch-up")
            relay.sever()
            assert relay.ghosts, "no session was left behind"
            workload(rig.site, random.Random(42), 30)
            rig.wait(lambda: "database error" in proc.output(), what="the ingester meeting the break")
            rig.wait(rig.caught_up, timeout=30, what="catch-up after the break")
            assert proc.poll() is None, proc.output()[-3000:]
            assert proc.output().count("leader lock taken") >= 2, proc.output()[-3000:]
            assert "ended this ingester's previous session" in proc.output()  # the server had kept it
            assert_equal_to_site(rig.store, rig.site)
            assert_applied_once(rig.store, rig.site)
    finally:
        relay.close()
