"""Case-insensitive text: the filter's value and the stored value lowered the same way.

The replica lowers a column with the database's lower() and a filter's value with its dialect's
``lower_value``: on both, per code point with the simple mapping, as SG's PostgreSQL does in a
UTF-8 locale (on SQLite ``sg_lower``, which SQLite calls itself; an older release used Python's
``str.lower`` there, and a replica it indexed has its indexes rebuilt at the first open). A PostgreSQL
database whose lower() lowers otherwise (LC_CTYPE C, tr_TR, ...) is found by a probe when the
replica opens, and its case-insensitive conditions and text sorts pass (``case-mapping``).
"""

from __future__ import annotations

import logging
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from cache.errors import Passthrough
from cache.read import Reader, ReplicaState
from cache.replica.dialect import POSTGRESQL, SQLITE, normalize_url
from cache.replica.schema import Schema
from cache.replica.statekeys import TEXT_LOWERING
from cache.replica.store import Store
from cache.replica.textcase import lower_simple

from .databases import drop_database_later, pg_base
from .fakesg import FakeSite
from .paths import BASIC_SCHEMA

CODES = {
    1: "ΟΔΟΣ",        # Greek: Python's str.lower() gives a final sigma (ς), PostgreSQL's lower() σ
    2: "İstanbul",    # dotted capital I: str.lower() gives "i̇" (two code points), lower() "i"
    3: "plain",
    4: "Ünïcode",     # Latin-1: lowered by lower() in a UTF-8 locale, not with LC_CTYPE C
}
SEQUENCE = "ΣΕΙΡΆ ΟΔΟΣ"


def _full(store: Store, entity_type: str, values: dict[str, Any]) -> dict[str, Any]:
    record = {f: None for f in store.schema.entities[entity_type].fields}
    record.update(values)
    return record


def _fill(store: Store, site: FakeSite | None = None) -> None:
    """A project, a sequence and :data:`CODES`' shots in the replica (and the fake SG)."""
    site = site or FakeSite.basic()
    project = site.create_direct("Project", {"name": "P"})
    seq = site.create_direct("Sequence", {"code": SEQUENCE, "project": {"type": "Project", "id": project["id"]}})
    link = {"type": "Sequence", "id": seq["id"], "name": SEQUENCE}
    with store.engine.begin() as conn:
        store.write_entities(conn, "Project", [_full(store, "Project", {"id": project["id"], "name": "P"})],
                             "scan", complete=True)
        store.write_entities(conn, "Sequence", [_full(store, "Sequence", {
            "id": seq["id"], "code": SEQUENCE, "project": {"type": "Project", "id": project["id"], "name": "P"}})],
            "scan", complete=True)
        shots = []
        for i, code in CODES.items():
            made = site.create_direct("Shot", {"code": code, "sg_sequence": {"type": "Sequence", "id": seq["id"]}})
            assert made["id"] == i
            shots.append(_full(store, "Shot", {"id": i, "code": code, "sg_sequence": link}))
        store.write_entities(conn, "Shot", shots, "scan", complete=True)
        for t in ("Project", "Sequence", "Shot"):
            store.mark_primed(conn, t)


@pytest.fixture
def pair(db_url: str) -> Iterator[tuple[FakeSite, Store]]:
    """The same rows in the fake SG and in a replica."""
    site = FakeSite.basic()
    st = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    _fill(st, site)
    yield site, st
    st.dispose()


def _read(store: Store, conditions: list[dict[str, Any]], sorts: list[dict[str, Any]] | None = None) -> list[int]:
    params: dict[str, Any] = {
        "type": "Shot", "return_fields": ["code"],
        "filters": {"logical_operator": "and", "conditions": conditions},
        "paging": {"entities_per_page": 500, "current_page": 1}, "return_only": "active",
    }
    if sorts is not None:
        params["sorts"] = sorts
    with store.engine.connect() as conn:
        result = Reader(store).read(conn, params, ReplicaState(store.primed_fields(conn)))
    return [e["id"] for e in result["entities"]]


def _cond(path: str, relation: str, *values: Any) -> list[dict[str, Any]]:
    return [{"path": path, "relation": relation, "values": list(values)}]


@pytest.mark.parametrize(("path", "relation", "value"), [
    ("code", "is", "ΟΔΟΣ"),            # the stored value itself
    ("code", "in", "ΟΔΟΣ"),
    ("code", "ends_with", "ΟΣ"),
    ("code", "is", "İstanbul"),
    ("code", "is", "ÜNÏCODE"),
    ("code", "starts_with", "İst"),    # the prefix range's bounds too
    ("code", "contains", "İst"),
    ("code", "not_contains", "ΟΔΟΣ"),
    ("sg_sequence", "name_is", SEQUENCE),
    ("sg_sequence", "name_contains", "ΟΔΟΣ"),
    ("sg_sequence.Sequence.code", "is", SEQUENCE),
])
def test_text_matches_its_own_value(pair: tuple[FakeSite, Store], path: str, relation: str, value: Any) -> None:
    """A text value matches itself whatever its letters, as the fake SG (and SG) finds it: on
    PostgreSQL the column was lowered by lower() and the value by str.lower(), which differ for a
    final sigma and a dotted capital I (a wrong answer, served as a hit)."""
    site, store = pair
    expected = [e["id"] for e in site.find_direct("Shot", [[path, relation, value]])]
    assert expected, "the fake SG finds the row"
    assert _read(store, _cond(path, relation, value)) == expected


def test_each_character_is_lowered_alone_on_every_database(pair: tuple[FakeSite, Store]) -> None:
    """Where Python's full mapping and the simple one differ, the replica follows SG's PostgreSQL
    (each character alone, 'İ' as 'i', a final 'Σ' as 'σ'), on SQLite too: before, SQLite kept
    Python's str.lower() and answered these otherwise than PostgreSQL (and SG)."""
    site, store = pair
    assert _read(store, _cond("code", "contains", "İ")) == [2, 3]
    assert _read(store, _cond("code", "is", "οδοσ")) == [1]
    assert _read(store, _cond("code", "is", "οδος")) == []
    for path, relation, value in [("code", "contains", "İ"), ("code", "is", "οδοσ"), ("code", "is", "οδος")]:
        assert _read(store, _cond(path, relation, value)) == [e["id"] for e in site.find_direct(
            "Shot", [[path, relation, value]])]


def test_text_sorts_as_the_fake_sg(pair: tuple[FakeSite, Store]) -> None:
    site, store = pair
    for direction in ("asc", "desc"):
        expected = [e["id"] for e in site.find_direct("Shot", [], order=[{"field_name": "code", "direction": direction}])]
        assert _read(store, [], [{"field_name": "code", "direction": direction}]) == expected


def test_a_value_is_lowered_per_code_point() -> None:
    assert lower_simple("ΟΔΟΣ") == "οδοσ" != "ΟΔΟΣ".lower()
    assert lower_simple("İstanbul") == "istanbul" != "İstanbul".lower()
    assert lower_simple("ÀB ẞ Ꭰ 𐐀") == "àb ß ꭰ 𐐨"
    assert POSTGRESQL.lower_value("MiXeD") == "mixed" == SQLITE.lower_value("MiXeD")
    assert SQLITE.lower_value("ΟΔΟΣ İ") == "οδοσ i" == POSTGRESQL.lower_value("ΟΔΟΣ İ")


def test_a_sqlite_replica_indexed_by_an_older_release_is_reindexed(
        db_url: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica an older release indexed holds Python's full lowering in its text-key indexes
    ('ΟΔΟΣ' as 'οδος'): the first open rebuilds them, once, and matches and sorts read through
    the index follow the new rule."""
    if backend != "sqlite":
        pytest.skip("SQLite's indexes on sg_lower")
    import cache.replica.dialect.sqlite as sqlite_dialect

    site = FakeSite.basic()
    monkeypatch.setattr(sqlite_dialect, "lower_simple", str.lower)  # the older release's sg_lower
    old = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    _fill(old, site)
    with old.engine.begin() as conn:
        conn.execute(old.state.delete().where(old.state.c.key == TEXT_LOWERING))  # the older release kept none
        assert conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE sql LIKE '%sg_lower%'").scalar()
    old.dispose()
    monkeypatch.undo()
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    try:
        with store.engine.connect() as conn:
            assert store.get_state(conn, TEXT_LOWERING) == "simple"
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        assert _read(store, _cond("code", "is", "οδοσ")) == [1]
        for direction in ("asc", "desc"):
            expected = [e["id"] for e in site.find_direct("Shot", [], order=[{"field_name": "code",
                                                                                "direction": direction}])]
            assert _read(store, [], [{"field_name": "code", "direction": direction}]) == expected
    finally:
        store.dispose()


def test_postgresql_lower_agrees_with_lower_value(db_url: str, backend: str) -> None:
    """The test database (a UTF-8 locale) passes the probe, and lowers as ``lower_value`` does."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's lower()")
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    try:
        assert store.lower_problem() is None
        with store.engine.connect() as conn:
            for text in [*CODES.values(), SEQUENCE, "ẞ Ǆ ᾈ Ꭰ 𐐀"]:
                assert conn.execute(sa.select(POSTGRESQL.lower(sa.literal(text)))).scalar() == lower_simple(text)
    finally:
        store.dispose()


@pytest.fixture
def c_ctype_url(backend: str) -> Iterator[str]:
    """A throwaway PostgreSQL database whose LC_CTYPE is C (lower() lowers ASCII only)."""
    if backend != "postgresql":
        pytest.skip("a PostgreSQL database's LC_CTYPE")
    base = pg_base()
    assert base is not None
    name = f"sgcache_ctype_c_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} ENCODING 'UTF8' LC_CTYPE 'C' LC_COLLATE 'C' TEMPLATE template0")
    parts = urllib.parse.urlsplit(base)
    try:
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        admin.dispose()
        drop_database_later(base, name)


def test_a_database_whose_lower_differs_passes_case_insensitive_reads(
        c_ctype_url: str, db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """LC_CTYPE C: a row 'Ünïcode' would never match 'ünïcode', and text would sort by its raw
    non-ASCII letters. The probe at open finds it, warns once naming the LC_CTYPE, and that
    replica passes what relies on lower(); exact conditions still answer, and another replica of
    the same process (a UTF-8 database) is not affected."""
    with caplog.at_level(logging.WARNING, logger="sgcache.store"):
        store = Store.open(c_ctype_url, Schema.load(BASIC_SCHEMA))
    other = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    try:
        warnings = [r for r in caplog.records if "lower()" in r.getMessage()]
        assert len(warnings) == 1 and "LC_CTYPE 'C'" in warnings[0].getMessage()
        assert "LC_CTYPE 'C'" in (store.lower_problem() or "")
        _fill(store)
        _fill(other)
        for conditions, sorts in [
            (_cond("code", "is", "ünïcode"), None),
            (_cond("code", "in", "plain", "x"), None),
            (_cond("code", "not_contains", "ï"), None),
            (_cond("code", "starts_with", "pl"), None),
            (_cond("sg_sequence", "name_is", SEQUENCE), None),
            (_cond("sg_sequence.Sequence.code", "is", SEQUENCE), None),
            ([], [{"field_name": "code", "direction": "asc"}]),
            ([], [{"field_name": "sg_sequence", "direction": "desc"}]),
        ]:
            with pytest.raises(Passthrough) as raised:
                _read(store, conditions, sorts)
            assert raised.value.reason == "case-mapping", (conditions, sorts)
            _read(other, conditions, sorts)  # answered
        assert _read(store, _cond("code", "is", None)) == []
        assert _read(store, _cond("id", "in", 2, 4)) == [2, 4]
        assert _read(store, _cond("sg_sequence", "type_is", "Sequence")) == [1, 2, 3, 4]
        assert len([r for r in caplog.records if "lower()" in r.getMessage()]) == 1  # asked once
    finally:
        store.dispose()
        other.dispose()


def test_the_probe_is_asked_once_per_replica(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's answer is the replica's (the dialect object is every replica's): a failure to
    ask is asked again, an answer is kept."""
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    try:
        _fill(store)
        asked: list[int] = []

        def problem(_conn: Any) -> str | None:
            asked.append(1)
            if len(asked) == 1:
                raise sa.exc.OperationalError("SELECT", {}, Exception("down"))
            return "LC_CTYPE 'tr_TR.UTF-8' (libc)"

        store._lower_problem = None  # as if never asked
        monkeypatch.setattr(store.dialect, "lower_problem", problem)
        with pytest.raises(sa.exc.OperationalError):
            store.lower_problem()
        with pytest.raises(Passthrough) as raised:
            _read(store, _cond("code", "is", "plain"))
        assert raised.value.reason == "case-mapping" and "tr_TR" in raised.value.detail
        assert _read(store, _cond("id", "is", 3)) == [3]
        assert len(asked) == 2
    finally:
        store.dispose()
