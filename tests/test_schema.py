"""The schema YAML format, the rules, and scripts/schema-dump + scripts/schema-filter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cache.replica.schema import Schema, SchemaError, parse_rules
from cache.replica.store import Store, entity_table_name

from .fakesg import FakeSite
from .paths import REPO
from .rig import Rig

FIXTURES = REPO.parent / "shared" / "fixtures"
#: schema_read keys with no place in the format: ``entity_type`` repeats the type, ``visible`` is UI state.
UNKEPT_KEYS = {"entity_type", "visible"}


def run(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def site_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    path = FIXTURES / "shotgun-schema-read.json"
    if not path.exists():
        pytest.skip(f"real site schema fixture absent: {path}")
    entity_path = FIXTURES / "shotgun-schema-entity-read.json"
    entity_read = json.loads(entity_path.read_text()) if entity_path.exists() else {}
    return json.loads(path.read_text()), entity_read


def _unwrap(entry: Any) -> Any:
    return entry["value"] if isinstance(entry, dict) and "value" in entry else entry


def _as_read(fschema: Any) -> dict[str, Any]:
    """A parsed field back in schema_read terms (unwrapped values), for comparing with SG's."""
    extra = dict(fschema.extra)
    props = dict(extra.pop("properties", {}))
    out = {"data_type": fschema.data_type, "name": extra.pop("label", None),
           "description": extra.pop("description", None)}
    out.update({k: extra.pop(k, None) for k in ("editable", "mandatory", "unique")})
    if fschema.links:
        props["valid_types"] = list(fschema.links)
    if fschema.values is not None:
        props["valid_values"] = list(fschema.values)
    if "default" in extra:
        props["default_value"] = extra.pop("default")
    assert not extra
    out["properties"] = props
    return out


def _sg_view(fspec: dict[str, Any]) -> dict[str, Any]:
    """SG's field spec unwrapped; empty values (None, '') dropped as the format does."""
    out = {k: _unwrap(v) for k, v in fspec.items() if k not in UNKEPT_KEYS and k != "properties"}
    out = {k: (None if v == "" else v) for k, v in out.items()}
    props = {k: _unwrap(v) for k, v in (fspec.get("properties") or {}).items()}
    if props.get("default_value") is None:
        props.pop("default_value", None)
    if props.get("valid_types") == []:
        props.pop("valid_types")
    out["properties"] = props
    return out


# -- the YAML format -------------------------------------------------------------------
def test_real_site_schema_round_trips(site_schema: tuple[dict[str, Any], dict[str, Any]]) -> None:
    schema_read, entity_read = site_schema
    schema = Schema.from_schema_read(schema_read, entity_read)
    again = Schema.from_yaml(schema.to_yaml())
    assert again == schema
    assert set(again.entities) == set(schema_read)
    for type_name, fields in schema_read.items():
        assert set(again.entities[type_name].fields) == set(fields)
        if type_name in entity_read:
            assert again.entities[type_name].label == _unwrap(entity_read[type_name]["name"])
        for fname, fspec in fields.items():
            # every property of every field is written down and read back
            assert _as_read(again.entities[type_name].fields[fname]) == _sg_view(fspec), (type_name, fname)


def test_short_and_long_field_forms() -> None:
    text = """
sgcache_schema: 1
entities:
  Shot:
    identifier: code
    fields:
      code: text
      sg_sequence: {type: entity, links: [Sequence]}
      sg_status_list: {type: status_list, values: [wtg, ip], label: Status, properties: {x: 1}}
"""
    schema = Schema.from_yaml(text)
    shot = schema.entities["Shot"]
    assert shot.identifier == "code" and "id" in shot.fields  # id is implied
    assert shot.fields["sg_sequence"].links == ("Sequence",)
    assert shot.fields["sg_status_list"].values == ("wtg", "ip")
    assert shot.fields["sg_status_list"].extra == {"label": "Status", "properties": {"x": 1}}
    assert Schema.from_yaml(schema.to_yaml()) == schema
    assert schema.to_dict()["entities"]["Shot"]["fields"]["code"] == "text"
    brief = schema.brief().to_dict()["entities"]["Shot"]["fields"]["sg_status_list"]
    assert brief == {"type": "status_list", "values": ["wtg", "ip"]}


@pytest.mark.parametrize("text", [
    "entities:\n  'Shot; DROP TABLE x':\n    fields: {code: text}\n",
    "entities:\n  Shot:\n    fields: {'bad-name': text}\n",
    "entities:\n  Shot:\n    fields: {'1code': text}\n",
    "entities:\n  Shot:\n    fields: {code: {links: [Sequence]}}\n",
    "sgcache_schema: 2\nentities: {}\n",
    "fields: {}\n",
    "entities: [1\n",
])
def test_invalid_schemas_refused(text: str) -> None:
    with pytest.raises(SchemaError):
        Schema.from_yaml(text)


def test_invalid_names_refused_from_schema_read() -> None:
    with pytest.raises(SchemaError):
        Schema.from_schema_read({"Shot": {"x y": {"data_type": {"value": "text"}}}})


# -- rules ----------------------------------------------------------------------------
def _schema() -> Schema:
    return Schema.from_yaml("""
entities:
  Shot: {fields: {code: text, sg_cut_in: number, sg_cut_out: number, image: image, description: text}}
  Asset: {fields: {code: text, sg_asset_type: list}}
  Task: {fields: {content: text}}
""")


def _kept(rules: str) -> dict[str, set[str]]:
    subset = _schema().filtered(parse_rules(rules))
    return {t: set(e.fields) for t, e in subset.entities.items()}


def test_rules_later_lines_win_and_globs() -> None:
    assert _kept("+Shot.*\n-Shot.sg_cut_*\n") == {"Shot": {"id", "code", "image", "description"}}
    assert _kept("-Shot.sg_cut_*\n+Shot.*\n") == {
        "Shot": {"id", "code", "image", "description", "sg_cut_in", "sg_cut_out"}}
    assert _kept("+*.code\n-Asset.*\n") == {"Shot": {"id", "code"}}
    assert _kept("+Shot.sg_cut_i?\n") == {"Shot": {"id", "sg_cut_in"}}


def test_rules_type_shorthand_and_comments() -> None:
    rules = "# a comment\n\n+Asset   # every field of Asset\n  -Asset.sg_asset_type\n+Task.content # trailing\n"
    assert parse_rules(rules) == [(True, "Asset.*"), (False, "Asset.sg_asset_type"), (True, "Task.content")]
    assert _kept(rules) == {"Asset": {"id", "code"}, "Task": {"id", "content"}}
    assert _kept("-Shot\n") == {}


@pytest.mark.parametrize("line", ["Shot.code", "+", "- ", "*Shot.code", "=Shot.code"])
def test_bad_rules_refused(line: str) -> None:
    with pytest.raises(SchemaError, match="line 2"):
        parse_rules(f"+Shot.code\n{line}\n")


# -- the scripts ----------------------------------------------------------------------
@pytest.fixture
def rig(tmp_path: Path, db_url: str) -> Iterator[Rig]:
    with Rig(tmp_path, db_url, FakeSite.basic(), prime=None, proxy=False) as r:
        yield r


def test_dump_filter_load_create(rig: Rig, tmp_path: Path, db_url: str) -> None:
    env = rig.env()
    site_yml = tmp_path / "site.yml"
    dumped = run("schema-dump", "-o", str(site_yml), env=env)
    assert dumped.returncode == 0, dumped.stderr
    site = Schema.load(site_yml)
    assert site == Schema.from_schema_read(rig.site.schema, rig.site.entity_schema)
    to_stdout = run("schema-dump", env=env)
    assert to_stdout.returncode == 0 and to_stdout.stdout == site_yml.read_text()

    filtered = run("schema-filter", "--rules", str(REPO / "schema" / "basic-filters.txt"), str(site_yml))
    assert filtered.returncode == 0, filtered.stderr
    my_yml = tmp_path / "my.yml"
    my_yml.write_text(filtered.stdout)
    schema = Schema.load(my_yml)
    assert "Shot" in schema and "image" not in schema.entities["Shot"].fields
    assert "TaskTemplate" not in schema
    store = Store.open(db_url, schema)
    try:
        tables = set(sa.inspect(store.engine).get_table_names())
        assert {entity_table_name(t) for t in schema.entities} <= tables
    finally:
        store.dispose()

    brief = run("schema-filter", "--brief", "--rules", str(REPO / "schema" / "basic-filters.txt"), str(site_yml))
    assert brief.returncode == 0 and "label: Date Created" not in brief.stdout
    assert Schema.from_yaml(brief.stdout) == schema.brief()


def test_dump_needs_a_site() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGCACHE_")}
    proc = run("schema-dump", env=env)
    assert proc.returncode != 0 and "--site" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("rules, schema_text, message", [
    ("+Shot.code\noops\n", "entities: {Shot: {fields: {code: text}}}\n", "rules line 2"),
    ("+Shot.code\n", "entities: [1\n", "not valid YAML"),
    ("+Shot.code\n", "entities: {Shot: {fields: [code]}}\n", "not a schema file"),
    ("+Shot.code\n", "- just a list\n", "top-level 'entities'"),
])
def test_filter_errors_exit_2(tmp_path: Path, rules: str, schema_text: str, message: str) -> None:
    (tmp_path / "rules.txt").write_text(rules)
    (tmp_path / "s.yml").write_text(schema_text)
    proc = run("schema-filter", "--rules", str(tmp_path / "rules.txt"), str(tmp_path / "s.yml"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_filter_unreadable_files_exit_2(tmp_path: Path) -> None:
    (tmp_path / "rules.txt").write_text("+Shot\n")
    for args in (["--rules", str(tmp_path / "missing.txt"), str(tmp_path / "rules.txt")],
                 ["--rules", str(tmp_path / "rules.txt"), str(tmp_path / "missing.yml")]):
        proc = run("schema-filter", *args)
        assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr


def test_a_type_or_field_no_longer_cached_is_unprimed_by_a_writer(db_url: str) -> None:
    """Its values stop being kept current when a writer (ingester, scanner) runs without it: if it comes
    back later, reads of it pass until a full scan primes it again. A proxy's subset schema un-primes nothing."""
    full = Schema.from_schema_read(FakeSite.basic().schema).brief().filtered(
        parse_rules("+Shot.*\n+Sequence.*\n+Project.*\n"))
    without = Schema.from_schema_read(FakeSite.basic().schema).brief().filtered(
        parse_rules("+Shot.*\n-Shot.sg_cut_in\n+Project.*\n"))

    def primed(schema: Schema, writer: bool = True) -> dict[str, set[str]]:
        store = Store.open(db_url, schema, create=False, writer=writer)
        try:
            store.create()
            with store.engine.begin() as conn:
                return store.primed_fields(conn)
        finally:
            store.dispose()

    store = Store.open(db_url, full, writer=True)
    with store.engine.begin() as conn:
        for name in ("Shot", "Sequence", "Project"):
            store.mark_primed(conn, name)
    store.dispose()
    assert "sg_cut_in" in primed(full)["Shot"] and "Sequence" in primed(full)
    primed(without, writer=False)  # a proxy with a subset schema
    assert "sg_cut_in" in primed(full)["Shot"] and "Sequence" in primed(full)
    primed(without)  # the ingester ran for a while without Shot.sg_cut_in and without Sequence
    back = primed(full)
    assert "sg_cut_in" not in back["Shot"] and "code" in back["Shot"]
    assert "Sequence" not in back and "Project" in back


def test_fields_whose_value_depends_on_the_reader_are_never_cached(db_url: str) -> None:
    """SG computes ``Version.viewed_by_current_user``, ``Project.current_user_favorite`` and the like
    for the user who reads them: one stored value would be served to every reader. A subset's rules
    never keep them, and a replica opened with a schema file that names them leaves them out (a read
    naming one passes, ``uncached-field``)."""
    from cache.errors import Passthrough
    from cache.read import Reader, ReplicaState

    text = """
sgcache_schema: 1
entities:
  Version:
    fields:
      code: text
      viewed_by_current_user: {type: list, values: [unread, read]}
      viewed_by_current_user_at: date_time
  Project:
    fields:
      name: text
      current_user_favorite: checkbox
"""
    schema = Schema.from_yaml(text)
    assert "viewed_by_current_user" in schema.entities["Version"].fields  # the file, as written
    assert schema.filtered(parse_rules("+Version.*\n+Project.*\n")).to_dict() == schema.cacheable().to_dict()
    assert set(schema.cacheable().entities["Version"].fields) == {"id", "code"}
    assert set(schema.cacheable().entities["Project"].fields) == {"id", "name"}
    store = Store.open(db_url, schema)
    try:
        assert store.schema.field("Version", "viewed_by_current_user") is None
        with store.engine.begin() as conn:
            store.mark_primed(conn, "Version")
        params = {"type": "Version", "return_fields": ["viewed_by_current_user"], "return_only": "active",
                  "filters": {"logical_operator": "and", "conditions": []},
                  "paging": {"entities_per_page": 50, "current_page": 1}}
        with store.engine.connect() as conn, pytest.raises(Passthrough) as info:
            Reader(store).read(conn, params, ReplicaState(store.primed_fields(conn)))
        assert info.value.reason == "uncached-field"
    finally:
        store.dispose()
