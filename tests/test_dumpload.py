"""scripts/dump-data and scripts/load-data on the oracle's site (tests/test_oracle.py's data).

Replica A is primed from the fake site by the scanner (in-process); ``dump-data`` writes it, and
``load-data --complete`` loads the file into the empty replica B. B dumps to the same file, and
answers the reads of the oracle's corpus (a sample: ``SAMPLE``) as A does (the read engine called
through a real ``shotgun_api3`` client whose HTTP goes to the engine: same answer, or the same pass
reason).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from cache.errors import Passthrough
from cache.read import Reader, ReplicaState
from cache.replica.schema import Schema, parse_rules
from cache.replica.site import Site, SiteMismatch, bind
from cache.replica.statekeys import EVENT_CURSOR
from cache.replica.store import Store
from cache.scan.dump import Dumper
from cache.scan.dumpformat import DumpError, Redactor
from cache.scan.load import Loader
from cache.scan.scanner import Scanner

from .databases import fresh_db_url
from .fakesg import FakeSite
from .processes import run_script
from .replica import SiteClient
from .rig import KEY, SCRIPT
from .test_oracle import DEEP, ENTITIES, GROUPS, LONG, RETURNS, RULES, SCALARS, SORTS, populate

SITE_URL = "https://studio.example.com"
#: A sample of the oracle's corpus: every SAMPLE-th case (the whole corpus costs four times the CPU
#: in each CI run, and the two replicas either hold the same rows or differ in many answers).
SAMPLE = 4
CORPUS = (SCALARS + ENTITIES + DEEP + GROUPS + RETURNS + SORTS + LONG)[::SAMPLE]


class Passed(Exception):
    """The read engine passed the read (``reason``)."""


class ReplicaClient(shotgun_api3.Shotgun):
    """A ``shotgun_api3`` client whose requests the read engine answers from ``store``."""

    def __init__(self, store: Store, info: dict[str, Any]):
        super().__init__(SITE_URL, script_name=SCRIPT, api_key=KEY, connect=False)
        self.store, self.reader, self.info_reply = store, Reader(store), info

    def _http_request(self, verb: str, path: str, body: Any, headers: Any) -> Any:
        payload = json.loads(body)
        if payload["method_name"] == "info":
            reply: Any = self.info_reply
        else:
            assert payload["method_name"] == "read", payload["method_name"]
            with self.store.engine.connect() as conn:
                state = ReplicaState(self.store.primed_fields(conn))
                try:
                    reply = {"results": self.reader.read(conn, payload["params"][1], state)}
                except Passthrough as exc:
                    raise Passed(exc.reason) from None
        return (200, "OK"), {"content-type": "application/json"}, json.dumps(reply)


def answer(client: ReplicaClient, entity_type: str, filters: Any, fields: Any, kw: dict[str, Any]) -> Any:
    kw = dict(kw)
    try:
        if kw.pop("one", False):
            return client.find_one(entity_type, filters, fields, **kw)
        return client.find(entity_type, filters, fields, **kw)
    except Passed as exc:
        return "pass", str(exc)


def dump_text(store: Store, **kw: Any) -> str:
    out = io.StringIO()
    Dumper(store, **kw).dump(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def site() -> FakeSite:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    populate(site)
    return site


@pytest.fixture(scope="module")
def schema_file(site: FakeSite, tmp_path_factory: pytest.TempPathFactory) -> Path:
    schema = Schema.from_schema_read(site.schema).brief().filtered(parse_rules(RULES))
    path = tmp_path_factory.mktemp("schema") / "schema.yml"
    path.write_text(schema.to_yaml(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def primed(site: FakeSite, schema_file: Path, module_db_url: str) -> Iterator[Store]:
    """Replica A: bound to the site and primed by the scanner (small pages)."""
    store = Store.open(module_db_url, Schema.load(schema_file))
    bind(store, Site.parse(SITE_URL))
    Scanner(store, SiteClient(site), page_size=4).prime(sorted(store.schema.entities))
    yield store
    store.dispose()


@pytest.fixture(scope="module")
def dump_file(primed: Store, schema_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dump") / "replica.jsonl.gz"
    run_script("dump-data", "-o", str(path), "--page-size", "3", "-q",
               env=_env(primed.engine.url.render_as_string(hide_password=False), schema_file))
    return path


@pytest.fixture(scope="module")
def loaded(dump_file: Path, schema_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """Replica B: empty, then loaded from A's dump with ``--complete``."""
    with fresh_db_url(tmp_path_factory.mktemp("loaded")) as url:
        run_script("load-data", str(dump_file), "--complete", "--page-size", "5", "-q",
                   env=_env(url, schema_file))
        store = Store.open(url, Schema.load(schema_file))
        yield store
        store.dispose()


def _env(db_url: str, schema_file: Path) -> dict[str, str]:
    """The scripts' environment: the replica and the schema (the URL's password stays out of argv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGCACHE_")}
    return {**env, "SGCACHE_DB": db_url, "SGCACHE_SCHEMA": str(schema_file)}


def test_dump_load_dump_gives_the_same_file(primed: Store, loaded: Store, dump_file: Path) -> None:
    first = gzip.decompress(dump_file.read_bytes()).decode()
    assert dump_text(loaded) == first
    assert dump_text(primed, page_size=1000) == first  # the page size changes nothing
    header = json.loads(first.splitlines()[0])
    assert header["site"] == Site.parse(SITE_URL).url
    assert all(info["complete"] for info in header["types"].values())
    assert sum(1 for line in first.splitlines() if '"_registry":true' in line) == 0  # every type is cached
    retired = [json.loads(line) for line in first.splitlines()[1:] if '"_retired":true' in line]
    assert {(r["type"], r["id"]) for r in retired} >= {("Shot", 8), ("Asset", 4), ("HumanUser", 3)}
    with primed.engine.connect() as a, loaded.engine.connect() as b:
        assert loaded.primed_fields(b) == primed.primed_fields(a)
        assert loaded.get_state(b, EVENT_CURSOR) == primed.get_state(a, EVENT_CURSOR) is not None


@pytest.mark.parametrize(("entity_type", "filters", "fields", "kw", "hit"), CORPUS)
def test_loaded_replica_answers_the_oracle_corpus_as_the_primed_one(
        corpus_clients: tuple[ReplicaClient, ReplicaClient], entity_type: str, filters: Any,
        fields: list[str] | None, kw: dict[str, Any], hit: bool) -> None:
    scanned, loaded = corpus_clients
    expected = answer(scanned, entity_type, filters, fields, kw)
    assert answer(loaded, entity_type, filters, fields, kw) == expected
    if hit:  # the engine answers what the proxy answers (a pass would compare nothing)
        assert not (isinstance(expected, tuple) and expected[0] == "pass"), expected


@pytest.fixture(scope="module")
def corpus_clients(site: FakeSite, primed: Store, loaded: Store) -> tuple[ReplicaClient, ReplicaClient]:
    return ReplicaClient(primed, site.info()), ReplicaClient(loaded, site.info())


def test_redact_changes_text_values_and_nothing_else(primed: Store) -> None:
    plain = dump_text(primed).splitlines()
    redacted = dump_text(primed, redactor=Redactor()).splitlines()
    assert len(plain) == len(redacted)
    assert json.loads(redacted[0]) == {**json.loads(plain[0]), "redacted": True}
    tokens: dict[str, str] = {}
    changed = 0

    def same_token(before: Any, after: Any) -> None:
        """A string becomes a token, the same for equal strings; anything else is kept."""
        nonlocal changed
        if isinstance(before, str) and before:
            assert after != before and after.startswith("~")
            assert tokens.setdefault(before, after) == after, before
            changed += 1
        else:
            assert after == before

    def links(before: Any, after: Any) -> None:
        for b, a in zip(before or [], after or [], strict=True) if isinstance(before, list) else [(before, after)]:
            if b is None:
                assert a is None
                continue
            assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
            same_token(b.get("name"), a.get("name"))

    def walk(before: Any, after: Any, kept: tuple[str, ...]) -> None:
        """Every string inside (keys apart, and the values of ``kept`` keys) becomes a token."""
        if isinstance(before, dict):
            assert before.keys() == after.keys()
            for k, v in before.items():
                assert after[k] == v if k in kept else walk(v, after[k], kept) is None
        elif isinstance(before, list):
            assert len(before) == len(after)
            for b, a in zip(before, after, strict=True):
                walk(b, a, kept)
        else:
            same_token(before, after)

    schema = primed.schema
    for p_line, r_line in zip(plain[1:], redacted[1:], strict=True):
        before, after = json.loads(p_line), json.loads(r_line)
        assert before.keys() == after.keys()
        for fname, value in before.items():
            fschema = schema.field(before["type"], fname)
            data_type = fschema.data_type if fschema else None
            if data_type == "text":
                same_token(value, after[fname])
            elif data_type in ("entity", "multi_entity", "addressing"):
                links(value, after[fname])
            elif data_type in ("url", "serializable"):
                walk(value, after[fname], kept=("link_type", "content_type") if data_type == "url" else ())
            else:
                assert after[fname] == value, (before["type"], before["id"], fname)
    assert changed > 50
    assert "sh010" in tokens and "Ann Lee" in tokens  # Shot 1's code and the name in links to it: one token


def test_load_refuses_another_site_a_changed_schema_and_a_primed_type(
        primed: Store, schema_file: Path, tmp_path: Path) -> None:
    text = dump_text(primed, types=["Step"])
    with fresh_db_url(tmp_path) as url:
        store = Store.open(url, Schema.load(schema_file))
        try:
            bind(store, Site.parse("https://other.example.com"))
            with pytest.raises(SiteMismatch):
                Loader(store, complete=True).load(io.StringIO(text))
        finally:
            store.dispose()
    header, *rest = text.splitlines(keepends=True)
    changed = json.loads(header)
    changed["types"]["Step"]["digest"] = "0" * 32
    with pytest.raises(DumpError, match="otherwise than the dump: Step"):
        Loader(primed).load(io.StringIO(json.dumps(changed) + "\n" + "".join(rest)))
    with pytest.raises(DumpError, match="already primed in this replica: Step"):
        Loader(primed).load(io.StringIO(text))


def test_a_project_dump_is_partial_and_loads_unprimed(primed: Store, schema_file: Path, tmp_path: Path) -> None:
    text = dump_text(primed, types=["Project", "Shot", "Step"], projects=[1])
    header = json.loads(text.splitlines()[0])
    assert {t: i["complete"] for t, i in header["types"].items()} == {"Project": False, "Shot": False, "Step": True}
    shots = [r for r in map(json.loads, text.splitlines()[1:]) if r["type"] == "Shot"]
    assert shots and {s["project"]["id"] for s in shots} == {1}
    with fresh_db_url(tmp_path) as url:
        store = Store.open(url, Schema.load(schema_file))
        try:
            with pytest.raises(DumpError, match="not complete for: Shot"):
                Loader(store, complete=["Shot"]).load(io.StringIO(text))
            stats = Loader(store, complete=True).load(io.StringIO(text))
            assert stats.primed == ["Step"]
            with store.engine.connect() as conn:
                assert set(store.primed_fields(conn)) == {"Step"}
        finally:
            store.dispose()


def test_links_to_retired_entities_of_types_left_out_stay_hidden(
        site: FakeSite, schema_file: Path, tmp_path: Path) -> None:
    """A link the replica held before its entity was retired (an event): a dump of the linking type
    alone carries the retirement in a registry line, so the loaded replica hides the link too."""
    schema = Schema.load(schema_file)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with fresh_db_url(tmp_path / "a") as url_a, fresh_db_url(tmp_path / "b") as url_b:
        source, target = Store.open(url_a, schema), Store.open(url_b, schema)
        try:
            def full(entity_type: str, **values: Any) -> dict[str, Any]:
                return {**{f: None for f in source.cached_field_names(entity_type)}, **values}

            with source.engine.begin() as conn:
                source.write_entities(conn, "Asset", [full("Asset", id=i, code=f"a{i}") for i in (1, 2)], "scan",
                                      complete=True)
                assets = [{"type": "Asset", "id": 1, "name": "a1"}, {"type": "Asset", "id": 2, "name": "a2"}]
                source.write_entities(conn, "Shot", [full("Shot", id=1, code="s1", assets=assets)], "scan",
                                      complete=True)
                source.set_retired(conn, "Asset", 2, True, source="event")
                for t in ("Asset", "Shot"):
                    source.mark_primed(conn, t)
            text = dump_text(source, types=["Shot"])
            lines = [json.loads(line) for line in text.splitlines()[1:]]
            assert lines[0]["assets"] == assets  # the replica's links, the retired one included
            assert lines[1:] == [{"type": "Asset", "id": 2, "name": "a2", "_retired": True, "_registry": True}]
            assert Loader(target, complete=["Shot"]).load(io.StringIO(text)).registry == 1
            expected = answer(ReplicaClient(source, site.info()), "Shot", [], ["assets"], {})
            assert expected == [{"type": "Shot", "id": 1, "assets": assets[:1]}]
            assert answer(ReplicaClient(target, site.info()), "Shot", [], ["assets"], {}) == expected
            assert dump_text(target, types=["Shot"]) == text
        finally:
            source.dispose()
            target.dispose()


def test_a_dump_reads_one_snapshot(schema_file: Path, tmp_path: Path) -> None:
    """Rows written while a dump runs are not in it; its header's cursor is the one of its rows."""
    schema = Schema.load(schema_file).filtered(parse_rules("+Shot.code\n"))
    with fresh_db_url(tmp_path) as url:
        store, writer = Store.open(url, schema), Store.open(url, schema, create=False, writer=True)
        try:
            with store.engine.begin() as conn:
                store.write_entities(conn, "Shot", [{"id": i, "code": f"s{i}"} for i in (1, 2, 3)], "scan",
                                     complete=True)
                store.set_state(conn, EVENT_CURSOR, 10)

            class Meanwhile:
                """A progress bar that writes a row and moves the cursor after the first page."""

                def __init__(self, **_kw: Any):
                    pass

                def __enter__(self) -> Meanwhile:
                    return self

                def __exit__(self, *exc: object) -> None:
                    pass

                def update(self, _n: int) -> None:
                    with writer.engine.begin() as conn:
                        writer.write_entities(conn, "Shot", [{"id": 9, "code": "new"}], "event", complete=True)
                        writer.set_state(conn, EVENT_CURSOR, 11)

            out = io.StringIO()
            Dumper(store, page_size=2, progress_factory=Meanwhile).dump(out)
            lines = [json.loads(line) for line in out.getvalue().splitlines()]
            assert lines[0]["event_cursor"] == 10
            assert [r["id"] for r in lines[1:]] == [1, 2, 3]
            assert [r["id"] for r in map(json.loads, dump_text(store).splitlines()[1:])] == [1, 2, 3, 9]
        finally:
            writer.dispose()
            store.dispose()
