"""The database's version asked on the event loop (cache/proxy/loopversions.py): shared questions,
every reader sees commits made before it asked, failures fail fast and never block the loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa

from cache.proxy.loopversions import LoopVersions, VersionUnknown
from cache.replica.dialect import dialect_for

from .databases import pg_base


@pytest.fixture
def pg_url(backend: str) -> str:
    """The PostgreSQL server's URL (through ``backend``: CI's PostgreSQL run selects these tests)."""
    base = pg_base()
    if not base:
        pytest.skip("needs PostgreSQL (SGCACHE_TEST_DB)")
    return base


def snapshots(url: str, sql: str = "", **kw: Any) -> LoopVersions:
    """The proxy's loop versions for ``url`` (asking ``sql`` instead of the snapshot, when given)."""
    dialect = dialect_for(url)
    connect = dialect.nonblocking_connect(dialect.create_engine(url))
    assert connect is not None
    return LoopVersions(connect, sql or dialect.data_version_sql, **kw)


@pytest.fixture
def counter(pg_url: str) -> Iterator[str]:
    """A question whose every answer is new (a sequence of this test's own): which question answered whom."""
    name = f"sgcache_test_{uuid.uuid4().hex}"
    with contextlib.closing(psycopg2.connect(pg_url)) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute(f"CREATE SEQUENCE {name}")
        try:
            yield f"SELECT nextval('{name}')"
        finally:
            cur.execute(f"DROP SEQUENCE {name}")


@pytest.fixture
def counted(pg_url: str, counter: str) -> Iterator[LoopVersions]:
    """Loop versions asking :func:`counter`'s question (closed after the test)."""
    versions = snapshots(pg_url, counter)
    yield versions
    versions.close()


def test_only_psycopg2_asks_versions_on_the_loop(tmp_path: Any) -> None:
    """SQLite, and PostgreSQL through another driver, ask their versions elsewhere (the inline
    connection, worker threads)."""
    import types

    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert dialect_for(url).nonblocking_connect(sa.create_engine(url)) is None
    postgresql = dialect_for("postgresql://u@h/d")
    assert postgresql.nonblocking_connect(sa.create_engine("postgresql+psycopg2://u@h/d")) is not None
    other = sa.create_engine("postgresql+pg8000://u@h/d", module=types.SimpleNamespace(paramstyle="format"))
    assert postgresql.nonblocking_connect(other) is None


def test_the_snapshot_moves_with_a_commit_made_before_the_question(pg_url: str) -> None:
    versions = snapshots(pg_url)
    writer = psycopg2.connect(pg_url)
    writer.autocommit = True

    async def run() -> None:
        before = await versions.version()
        assert isinstance(before, str) and before.count(":") == 2  # xmin:xmax:in-progress
        with writer.cursor() as cur:
            cur.execute("SELECT txid_current()")  # a transaction with an id, committed: the snapshot moves
        assert await versions.version() != before

    try:
        asyncio.run(run())
    finally:
        versions.close()
        writer.close()


def test_readers_arriving_together_share_one_question(counted: LoopVersions) -> None:
    versions = counted

    async def run() -> None:
        first = await versions.version()
        together = await asyncio.gather(*(versions.version() for _ in range(20)))
        assert together == [first + 1] * 20

    asyncio.run(run())


def test_a_reader_arriving_while_a_question_is_on_the_wire_takes_the_next_one(counted: LoopVersions) -> None:
    """The question on the wire may have been answered before the reader's client saw its write
    committed: the reader waits for a question sent after it arrived."""
    versions = counted

    async def run() -> None:
        first = await versions.version()  # connected
        early = asyncio.ensure_future(versions.version())
        for _ in range(3):
            await asyncio.sleep(0)  # the question is sent
        assert versions.asked == 2
        late = await asyncio.gather(versions.version(), versions.version())
        assert await early == first + 1
        assert late == [first + 2] * 2

    asyncio.run(run())


def test_a_reader_that_gives_up_does_not_cancel_the_question_for_the_others(counted: LoopVersions) -> None:
    versions = counted

    async def run() -> None:
        first = await versions.version()
        quitter = asyncio.ensure_future(versions.version())
        stayer = asyncio.ensure_future(versions.version())
        await asyncio.sleep(0)
        quitter.cancel()
        assert await stayer == first + 1

    asyncio.run(run())


def test_the_socket_stays_watched_between_questions_and_a_server_gone_meanwhile_is_noticed(pg_url: str) -> None:
    """Watched once for many questions (watching it anew for each cost more than the question);
    the server ending the connection while no question is on the wire fails it at once, on the
    loop, and lets go of the socket."""
    versions = snapshots(pg_url, retry_after=0)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        watched: list[int] = []
        add_reader = loop.add_reader
        loop.add_reader = lambda fd, *a: watched.append(fd) or add_reader(fd, *a)  # type: ignore[method-assign]
        await versions.version()  # connected (its setup watches the socket too) and watched
        assert versions._watching is not None
        watched.clear()
        for _ in range(5):
            await versions.version()
        assert watched == []  # (each question watched and let go of it before)
        pid = versions._conn.get_backend_pid()
        with contextlib.closing(psycopg2.connect(pg_url)) as admin, admin.cursor() as cur:
            admin.autocommit = True
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(100):
            if versions._conn is None:
                break
            await asyncio.sleep(0.01)
        assert versions._conn is None and versions._watching is None  # noticed while idle
        await versions.version()  # a new connection, watched anew
        assert versions._watching is not None and watched

    try:
        asyncio.run(run())
    finally:
        versions.close()


class AtOnce:
    """psycopg2's asynchronous protocol with every question answered at once (``poll`` is always
    done): a question can end before the task that asks it was even scheduled."""

    def __init__(self) -> None:
        self.asked = 0
        self.quiet = socket.socketpair()  # watched between questions, never readable

    def poll(self) -> int:
        return psycopg2.extensions.POLL_OK

    def fileno(self) -> int:
        return self.quiet[0].fileno()

    def cursor(self) -> AtOnce:
        return self

    def execute(self, _sql: str) -> None:
        self.asked += 1

    def fetchone(self) -> tuple[int]:
        return (self.asked,)

    def close(self) -> None:
        for end in self.quiet:
            end.close()


EAGER = getattr(asyncio, "eager_task_factory", None)  # Python 3.12: mitmproxy runs tasks eagerly


@pytest.mark.parametrize("eager", [False, True], ids=["tasks", "eager-tasks"])
def test_questions_answered_at_once_leave_no_reader_waiting(eager: bool) -> None:
    """mitmproxy on Python 3.12 starts a task inside create_task: the driver takes the reader's
    question, may answer it and end before create_task returns; the next reader starts a new one."""
    if eager and EAGER is None:
        pytest.skip("eager tasks need Python 3.12")
    versions = LoopVersions(AtOnce, "SELECT 1")

    async def run() -> None:
        if eager:
            asyncio.get_running_loop().set_task_factory(EAGER)
        one_by_one = [await asyncio.wait_for(versions.version(), 2) for _ in range(5)]
        assert one_by_one == [1, 2, 3, 4, 5]
        together = await asyncio.wait_for(asyncio.gather(*(versions.version() for _ in range(4))), 2)
        assert min(together) == 6 and versions.asked <= 9  # each a question sent after it arrived
        assert await asyncio.wait_for(versions.version(), 2) == versions.asked

    asyncio.run(run())
    versions.close()


def test_closing_with_a_question_on_the_wire_lets_go_of_its_socket_first(pg_url: str) -> None:
    """The replica closed while a question waits for its answer: the question is cancelled (its
    reader told), its socket callback removed, then the connection closed; later questions fail."""
    versions = snapshots(pg_url, "SELECT pg_sleep(2)", timeout=10)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(versions.version(), 10)  # connected (a first 2 s question)
        conn = versions._conn
        fd = conn.fileno()
        waiting = asyncio.ensure_future(versions.version())
        for _ in range(20):  # the second question is on the wire, its socket watched
            await asyncio.sleep(0.01)
        assert loop._selector.get_map().get(fd) is not None  # type: ignore[attr-defined]
        versions.close()
        with pytest.raises(VersionUnknown):
            await asyncio.wait_for(waiting, 2)
        await asyncio.sleep(0.05)
        assert loop._selector.get_map().get(fd) is None  # type: ignore[attr-defined]
        assert conn.closed
        with pytest.raises(VersionUnknown):
            await versions.version()

    asyncio.run(run())


@pytest.fixture
def silent_server() -> Iterator[tuple[str, int]]:
    """A TCP server that accepts connections and never says a word (a database hung or cut off)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_database_that_never_answers_fails_the_question_in_time_without_blocking_the_loop(
        silent_server: tuple[str, int]) -> None:
    host, port = silent_server
    url = f"postgresql://nobody@{host}:{port}/none"
    now = [0.0]
    versions = snapshots(url, timeout=0.3, retry_after=5.0, clock=lambda: now[0])

    async def run() -> None:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        started = time.monotonic()
        with pytest.raises(VersionUnknown):
            await versions.version()
        waited = time.monotonic() - started
        assert 0.25 <= waited < 3.0
        assert ticks >= 5  # the loop went on serving while the question waited
        # for retry_after, questions fail at once: no connection is tried
        asked = versions.asked
        with pytest.raises(VersionUnknown):
            await versions.version()
        assert versions.asked == asked
        now[0] += 5.0  # then it tries again
        with pytest.raises(VersionUnknown):
            await versions.version()
        ticker.cancel()

    asyncio.run(run())


def test_a_question_over_its_time_tells_every_waiting_reader_and_lets_go_of_its_socket(pg_url: str) -> None:
    """On a connection already made: the question on the wire and the readers waiting for the next
    one all fail at its deadline; its socket is no longer watched, its connection closed; questions
    fail at once for ``retry_after``, then a new connection answers."""
    now = [0.0]
    versions = snapshots(pg_url, "SELECT pg_sleep(2)", timeout=0.2, retry_after=5.0, clock=lambda: now[0])

    async def run() -> None:
        loop = asyncio.get_running_loop()
        versions.timeout = 5.0
        await versions.version()  # connected (its first question, 2 s, within the longer deadline)
        versions.timeout = 0.2
        conn = versions._conn
        fd = conn.fileno()
        on_wire = asyncio.ensure_future(versions.version())
        await asyncio.sleep(0.05)
        next_one = asyncio.ensure_future(versions.version())  # arrived while a question is on the wire
        started = time.monotonic()
        for reader in (on_wire, next_one):
            with pytest.raises(VersionUnknown):
                await asyncio.wait_for(reader, 2)
        assert time.monotonic() - started < 1.5  # at the deadline, not when the server answers (2 s)
        assert loop._selector.get_map().get(fd) is None  # type: ignore[attr-defined]
        assert conn.closed and versions._conn is None
        asked = versions.asked
        with pytest.raises(VersionUnknown):  # fails at once for retry_after: nothing sent
            await versions.version()
        assert versions.asked == asked
        now[0] += 5.0
        versions.timeout = 5.0
        await asyncio.wait_for(versions.version(), 5)  # answered, on a new connection:
        assert versions._conn is not None and versions._conn is not conn

    try:
        asyncio.run(run())
    finally:
        versions.close()


def test_a_broken_connection_is_replaced(pg_url: str) -> None:
    now = [0.0]
    versions = snapshots(pg_url, clock=lambda: now[0])
    killer = psycopg2.connect(pg_url)
    killer.autocommit = True

    async def run() -> None:
        await versions.version()
        pid = versions._conn.get_backend_pid()
        with killer.cursor() as cur:  # the server ends the connection (a restart, an idle cut-off)
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(50):  # until the server has closed it
            try:
                await versions.version()
            except VersionUnknown:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("a terminated connection kept answering")
        now[0] += 10.0
        assert isinstance(await versions.version(), str)  # a new connection
        assert versions._conn.get_backend_pid() != pid

    try:
        asyncio.run(run())
    finally:
        versions.close()
        killer.close()
