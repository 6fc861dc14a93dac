"""Fail open, end to end: the replica dies, loses a table or goes stale, and every client still gets SG's answer.

PostgreSQL is "stopped" without touching the shared server: mitmdump reaches it through a TCP relay
owned by the test, and cutting the relay (listener and every relayed socket) is the outage. On SQLite
the replica file is renamed away (the tests run as root, for whom ``chmod 000`` changes nothing).

A database that hangs instead (it keeps its connections open and answers nothing) is the relay
stalled (:meth:`TcpRelay.stall`: nothing is forwarded either way), or another connection holding
the replica's write lock (SQLite ``BEGIN IMMEDIATE``, the PostgreSQL advisory lock of writes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cache.replica.dialect import normalize_url
from cache.replica.dialect.postgresql import WRITE_LOCK_SQL
from cache.replica.schema import Schema
from cache.replica.store import Store, now_utc

from .rig import KEY, SCRIPT, Rig
from .wait import wait_until

QUERIES: list[tuple[str, list[Any], list[str]]] = [
    ("Shot", [["code", "is", "sh010"]], ["code", "sg_cut_in"]),
    ("Shot", [["sg_status_list", "is", "ip"]], ["code", "sg_sequence", "assets"]),
    ("Sequence", [], ["code"]),
]


class TcpRelay:
    """127.0.0.1:<port> -> target, in threads; :meth:`cut` drops everything, :meth:`restore` listens again
    on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()  # cleared: stalled
        self._flowing.set()
        #: Connections accepted so far (each one a connection some process opened to the database).
        self.accepted = 0

    def start(self) -> TcpRelay:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    restore = start

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self._flowing.wait() and (data := src.recv(65536)):
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """The database "stops": nothing listens, every open connection is reset."""
        with self._lock:
            listener, self._listener = self._listener, None
            socks, self._socks = self._socks, set()
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for s in socks:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    close = cut

    def stall(self) -> None:
        """The database hangs: its connections stay open (new ones are accepted), nothing is forwarded."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again what waited and what comes."""
        self._flowing.set()


def relayed_url(db_url: str, port: int) -> str:
    """The same database URL (and options) with host:port replaced by the relay's."""
    parts = urllib.parse.urlsplit(db_url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{port}"))


def raw_call(rig: Rig, method: str, args: Any, key: str = KEY) -> tuple[str, Any]:
    """One API3 POST through the proxy with urllib: (X-SGCache header, decoded reply)."""
    body = json.dumps({"method_name": method, "params": [{"script_name": SCRIPT, "script_key": key}, args]})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{rig.proxy.address}"}))
    req = urllib.request.Request(rig.server.url + "/api3/json", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    with opener.open(req, timeout=30) as resp:
        return resp.headers.get("X-SGCache", ""), json.loads(resp.read())


def read_args(entity_type: str, fields: list[str]) -> dict[str, Any]:
    return {"type": entity_type, "return_fields": fields, "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 500, "current_page": 1}, "return_paging_info": False}


def direct_raw(rig: Rig, args: dict[str, Any]) -> Any:
    body = json.dumps({"method_name": "read", "params": [{"script_name": SCRIPT, "script_key": KEY}, args]})
    req = urllib.request.Request(rig.server.url + "/api3/json", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def is_hit(rig: Rig, sg: Any, query: tuple[str, list[Any], list[str]]) -> bool:
    before = rig.reads()
    sg.find(*query)
    return rig.reads() == before


def wait_for_hits(rig: Rig, sg: Any, timeout: float = 20.0) -> None:
    wait_until(lambda: is_hit(rig, sg, QUERIES[0]), timeout, "hits to resume", pause=0.2,
               detail=lambda: rig.proxy.output()[-3000:])


class ReadLoad:
    """A client thread reading in a loop through the proxy, checking every answer against SG's."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.expected = [rig.direct().find(*q) for q in QUERIES]
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sg = self.rig.client()
        i = 0
        while not self._stop.is_set():
            n = i % len(QUERIES)
            try:
                got = sg.find(*QUERIES[n])
                if got != self.expected[n]:
                    self.errors.append(f"query {n}: {got!r} != {self.expected[n]!r}")
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.errors.append(f"query {n}: {type(exc).__name__}: {exc}")
            self.done += 1
            i += 1

    def __enter__(self) -> ReadLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def run_for(self, seconds: float) -> None:
        start = self.done
        time.sleep(seconds)
        assert self.done > start, "the read load stalled"


def pass_counts(rig: Rig) -> dict[str, int]:
    return rig.client().info()["sgcache"]["passes"]


def outage_under_load(rig: Rig, stop: Callable[[], None], start: Callable[[], None]) -> None:
    sg = rig.client()
    sg.find_one("Project", [])  # SG accepts the credentials: reads may be hits
    wait_for_hits(rig, sg)
    with ReadLoad(rig) as load:
        load.run_for(0.5)
        stop()
        load.run_for(3.0)
        during = pass_counts(rig)
        start()
        wait_for_hits(rig, sg)
        load.run_for(0.5)
    assert not load.errors, load.errors[:5]
    assert during.get("db-error", 0) >= 1, during
    assert during.get("db-backoff", 0) >= 1, f"the breaker never opened: {during}"
    for query in QUERIES:
        assert is_hit(rig, sg, query)
    assert rig.proxy.proc is not None and rig.proxy.proc.poll() is None
    assert "Traceback" not in rig.proxy.output()


@contextlib.contextmanager
def relayed_rig(tmp_path: Path, db_url: str) -> Iterator[tuple[Rig, TcpRelay]]:
    """A rig whose proxy reaches PostgreSQL through a relay the test can cut or stall."""
    parts = urllib.parse.urlsplit(db_url)
    relay = TcpRelay((parts.hostname or "127.0.0.1", parts.port or 5432)).start()
    try:
        with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=0"], proxy_db_url=relayed_url(db_url, relay.port)) as rig:
            yield rig, relay
    finally:
        relay.resume()
        relay.close()


def test_postgresql_stopped_under_load(tmp_path: Path, db_url: str, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("PostgreSQL variant (SQLite: test_sqlite_file_gone_under_load)")
    with relayed_rig(tmp_path, db_url) as (rig, relay):
        outage_under_load(rig, relay.cut, relay.restore)


def test_sqlite_file_gone_under_load(tmp_path: Path, db_url: str, backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("SQLite variant (PostgreSQL: test_postgresql_stopped_under_load)")
    path = Path(db_url.removeprefix("sqlite:///"))
    away = path.with_name(path.name + ".away")
    with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=0"]) as rig:
        outage_under_load(rig, lambda: os.rename(path, away), lambda: os.rename(away, path))


def test_missing_table_passes_with_its_reason(tmp_path: Path, db_url: str) -> None:
    with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=0"]) as rig:
        args = read_args("Shot", ["code"])
        raw_call(rig, "read", args)  # SG accepts the credentials
        header, reply = raw_call(rig, "read", args)
        assert header == "hit"
        assert reply == direct_raw(rig, args)
        store = Store.open(db_url, Schema.load(rig.schema_path), create=False)
        try:
            with store.engine.begin() as conn:
                store.tables["Shot"].drop(conn)
        finally:
            store.dispose()
        for _ in range(5):
            header, reply = raw_call(rig, "read", args)
            assert header == "pass; reason=missing-table"
            assert reply == direct_raw(rig, args)
        assert "missing-table" in rig.proxy.output()
        # one broken table is not a dead database: other types are still served
        other = read_args("Sequence", ["code"])
        assert raw_call(rig, "read", other) == ("hit", direct_raw(rig, other))


def test_stale_replica_passes_until_the_heartbeat_is_fresh(tmp_path: Path, db_url: str) -> None:
    with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=60"]) as rig:
        store = rig.store
        with store.engine.begin() as conn:
            store.set_state(conn, "ingester_heartbeat", "2001-02-03T04:05:06Z")
        args = read_args("Shot", ["code", "sg_cut_in"])
        raw_call(rig, "read", args)  # SG accepts the credentials
        # the proxy re-reads the replica's state once a second: wait for it to see the old heartbeat
        header, reply = wait_until(lambda: _answer_if(rig, args, "pass; reason=stale"), 10, "a stale pass")
        assert reply == direct_raw(rig, args)
        with store.engine.begin() as conn:
            store.set_state(conn, "ingester_heartbeat", now_utc().strftime("%Y-%m-%dT%H:%M:%SZ"))
        header, reply = wait_until(lambda: _answer_if(rig, args, "hit"), 10, "a hit after a fresh heartbeat")
        assert reply == direct_raw(rig, args)


def _answer_if(rig: Rig, args: dict[str, Any], header: str) -> tuple[str, Any] | None:
    """The proxy's (header, reply) to a read when its header is ``header``, else None."""
    got = raw_call(rig, "read", args)
    return got if got[0] == header else None


def test_proxy_starts_and_passes_when_the_database_is_down_at_start(tmp_path: Path, backend: str) -> None:
    """No database at start-up: the proxy still runs, every request gets SG's answer."""
    if backend == "postgresql":
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dead_url = f"postgresql://postgres@127.0.0.1:{port}/test"
    else:
        dead_url = f"sqlite:///{tmp_path / 'no-such-dir' / 'replica.db'}"
    with Rig(tmp_path, dead_url, prime=None, proxy=["sgcache_max_lag=0"]) as rig:
        sg = rig.client()
        expected = rig.direct().find("Shot", [["code", "is", "sh010"]], ["code"])
        before = rig.reads()
        for _ in range(3):
            assert sg.find("Shot", [["code", "is", "sh010"]], ["code"]) == expected
        assert rig.reads() == before + 3
        assert sg.info()["version"] == list(rig.site.version)
        assert "cannot open the replica" in rig.proxy.output()
        assert "Traceback" not in rig.proxy.output()


#: A write through the proxy while its database hangs answers within this (the proxy waits at most
#: sgcache_write_wait, 2 s, for the database; before it waited 30 s on SQLite's busy timeout, 10 s on
#: PostgreSQL's statement timeout, and for ever on a PostgreSQL server that does not answer).
HUNG_WRITE_SECONDS = 8.0


@contextlib.contextmanager
def write_lock_held(db_url: str) -> Iterator[None]:
    """Another connection holds the replica's write lock (the proxy's learning waits for it)."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
        finally:
            conn.close()
        return
    engine = sa.create_engine(normalize_url(db_url))  # the test's schema (search_path) too
    try:
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql(WRITE_LOCK_SQL)
            yield
    finally:
        engine.dispose()


def write_while(rig: Rig, hang: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
    """Update a Shot through the proxy while ``hang()`` holds the database: the answer comes within
    :data:`HUNG_WRITE_SECONDS`, the write reaches SG once, and reads through the proxy, while the
    database hangs and after, return the written value."""
    sg = rig.client()
    shot = sg.find_one("Shot", [["code", "is", "sh010"]], ["sg_cut_in"])
    sg.update("Shot", shot["id"], {"sg_cut_in": 2001})  # SG knows the script; the write path's connections are open
    assert sg.find_one("Shot", [["id", "is", shot["id"]]], ["sg_cut_in"])["sg_cut_in"] == 2001
    updates = rig.site.count("update")
    with hang():
        started = time.monotonic()
        answer = sg.update("Shot", shot["id"], {"sg_cut_in": 2002})
        took = time.monotonic() - started
        assert answer["sg_cut_in"] == 2002
        during = sg.find_one("Shot", [["id", "is", shot["id"]]], ["sg_cut_in"])
    assert took < HUNG_WRITE_SECONDS, f"the write took {took:.1f}s with the database hung"
    assert during["sg_cut_in"] == 2002, "a read while the database hung missed the client's write"
    assert rig.site.count("update") == updates + 1, "the write was not sent exactly once"
    for _ in range(3):  # the database answers again
        assert sg.find_one("Shot", [["id", "is", shot["id"]]], ["sg_cut_in"])["sg_cut_in"] == 2002
    assert rig.direct().find_one("Shot", [["id", "is", shot["id"]]], ["sg_cut_in"])["sg_cut_in"] == 2002
    assert "Traceback" not in rig.proxy.output()


def test_a_write_is_not_held_by_a_locked_replica(tmp_path: Path, db_url: str) -> None:
    """Another process holds the replica's write lock: the write's answer is not learnt in time,
    the client gets SG's answer at once, and this proxy's reads of what it changed pass."""
    with Rig(tmp_path, db_url, proxy=["sgcache_max_lag=0"]) as rig:
        write_while(rig, lambda: write_lock_held(db_url))


def test_a_write_is_not_held_by_a_hung_postgresql(tmp_path: Path, db_url: str, backend: str) -> None:
    """The PostgreSQL server stops answering on open connections (a stalled relay): no server-side
    timeout can fire; the proxy's own wait bounds the write's delay."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only (a SQLite replica is a local file)")
    with relayed_rig(tmp_path, db_url) as (rig, relay):

        @contextlib.contextmanager
        def stalled() -> Iterator[None]:
            relay.stall()
            safety = threading.Timer(20, relay.resume)  # without the fix the write waits for this
            safety.start()
            try:
                yield
            finally:
                safety.cancel()
                relay.resume()

        write_while(rig, stalled)


def test_a_proxy_whose_postgresql_hangs_still_exits_on_sigterm(tmp_path: Path, db_url: str, backend: str) -> None:
    """The PostgreSQL server stops answering while reads and a write have threads waiting on it:
    SIGTERM still ends the proxy within seconds (those threads never return while it hangs, and
    the interpreter would wait for them at exit for ever)."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only (a SQLite replica is a local file)")
    with relayed_rig(tmp_path, db_url) as (rig, relay):
        sg = rig.client()
        shot = sg.find_one("Shot", [["code", "is", "sh010"]], ["sg_cut_in"])
        relay.stall()
        sg.update("Shot", shot["id"], {"sg_cut_in": 2003})  # its database steps stay stuck
        sg.find_one("Shot", [["id", "is", shot["id"]]], ["sg_cut_in"])  # passes; its thread stays stuck
        proxy = rig.proxy
        assert proxy is not None and proxy.proc is not None
        proc = proxy.proc
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        took = time.monotonic() - started
        relay.resume()
        assert proc.poll() is not None and took < 10, f"still running {took:.1f}s after SIGTERM"
