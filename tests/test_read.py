"""Unit tests of the read engine on a replica filled directly (no SG, no proxy)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cache import fastjson
from cache.errors import Passthrough
from cache.read import Reader, ReplicaState
from cache.replica.schema import Schema
from cache.replica.store import Store

from .paths import BASIC_SCHEMA

SEQ = {"type": "Sequence", "id": 1, "name": "SQ01"}
PROJECT = {"type": "Project", "id": 1, "name": "Demo"}


@pytest.fixture(scope="module")
def store(module_db_url: str) -> Iterator[Store]:
    """One filled replica for the module: its tests only read (a test that writes takes ``own_store``)."""
    st = filled_store(module_db_url)
    yield st
    st.dispose()


@pytest.fixture
def own_store(db_url: str) -> Iterator[Store]:
    """A filled replica for this test alone."""
    st = filled_store(db_url)
    yield st
    st.dispose()


def filled_store(url: str) -> Store:
    """Projects, a sequence, assets and shots (one of them retired), every type primed."""
    st = Store.open(url, Schema.load(BASIC_SCHEMA))
    with st.engine.begin() as conn:
        st.write_entities(conn, "Project", [_project(1, "Demo", False), _project(2, "Old", True)], "scan", complete=True)
        st.write_entities(conn, "Sequence", [_full(st, "Sequence", {"id": 1, "code": "SQ01", "project": PROJECT})],
                          "scan", complete=True)
        st.write_entities(conn, "Asset", [_full(st, "Asset", {"id": i, "code": f"asset{i}"}) for i in (1, 2, 3)],
                          "scan", complete=True)
        shots = [
            {"id": 1, "code": "sh010", "sg_cut_in": 1001, "sg_sequence": SEQ, "project": PROJECT,
             "sg_status_list": "ip", "assets": [{"type": "Asset", "id": 1, "name": "asset1"}]},
            {"id": 2, "code": "SH020", "sg_cut_in": 1010, "sg_sequence": None, "project": PROJECT,
             "sg_status_list": "fin", "assets": [{"type": "Asset", "id": 2, "name": "asset2"},
                                                  {"type": "Asset", "id": 3, "name": "asset3"}]},
            {"id": 3, "code": None, "sg_cut_in": None, "sg_sequence": SEQ,
             "project": {"type": "Project", "id": 2, "name": "Old"}, "sg_status_list": None, "assets": []},
            {"id": 4, "code": "sh040_ü", "sg_cut_in": 990, "sg_sequence": SEQ, "project": PROJECT,
             "sg_status_list": "ip", "assets": []},
        ]
        st.write_entities(conn, "Shot", [_full(st, "Shot", s) for s in shots], "scan", complete=True)
        st.write_entities(conn, "Shot", [_full(st, "Shot", {"id": 5, "code": "gone"})], "scan", complete=True,
                          retired=True)
        for t in ("Project", "Sequence", "Asset", "Shot"):
            st.mark_primed(conn, t)
    return st


def _project(pid: int, name: str, archived: bool) -> dict[str, Any]:
    return {"id": pid, "name": name, "archived": archived}


def _full(store: Store, entity_type: str, values: dict[str, Any]) -> dict[str, Any]:
    """A complete record: every cached field, None unless given."""
    record = {f: None for f in store.schema.entities[entity_type].fields}
    record.update(values)
    return record


def read(store: Store, **params: Any) -> dict[str, Any]:
    params.setdefault("type", "Shot")
    params.setdefault("return_fields", ["code"])
    params.setdefault("filters", {"logical_operator": "and", "conditions": []})
    params.setdefault("paging", {"entities_per_page": 500, "current_page": 1})
    params.setdefault("return_only", "active")
    with store.engine.connect() as conn:
        replica_state = ReplicaState(store.primed_fields(conn))
        return Reader(store).read(conn, params, replica_state)


def ids(result: dict[str, Any]) -> list[int]:
    return [e["id"] for e in result["entities"]]


def cond(path: str, relation: str, *values: Any) -> dict[str, Any]:
    return {"logical_operator": "and", "conditions": [{"path": path, "relation": relation, "values": list(values)}]}


def test_default_order_is_id_and_retired_rows_are_hidden(store: Store) -> None:
    assert ids(read(store)) == [1, 2, 3, 4]
    assert ids(read(store, return_only="retired")) == [5]


def test_text_is_case_insensitive_and_is_not_keeps_null(store: Store) -> None:
    assert ids(read(store, filters=cond("code", "is", "SH010"))) == [1]
    assert ids(read(store, filters=cond("code", "is_not", "sh010"))) == [2, 3, 4]
    assert ids(read(store, filters=cond("code", "is", None))) == [3]
    assert ids(read(store, filters=cond("code", "is_not", None))) == [1, 2, 4]
    assert ids(read(store, filters=cond("code", "in", "sh020", "SH040_Ü"))) == [2, 4]
    assert ids(read(store, filters=cond("code", "not_in", "sh020"))) == [1, 3, 4]
    assert ids(read(store, filters=cond("code", "contains", "H0"))) == [1, 2, 4]
    assert ids(read(store, filters=cond("code", "starts_with", "sh0"))) == [1, 2, 4]
    assert ids(read(store, filters=cond("code", "ends_with", "_Ü"))) == [4]


def test_like_wildcards_in_values_are_literal(store: Store) -> None:
    assert ids(read(store, filters=cond("code", "contains", "%"))) == []
    assert ids(read(store, filters=cond("code", "contains", "0_"))) == [4]


def test_numbers(store: Store) -> None:
    assert ids(read(store, filters=cond("sg_cut_in", "is", 1001))) == [1]
    assert ids(read(store, filters=cond("sg_cut_in", "greater_than", 1000))) == [1, 2]
    assert ids(read(store, filters=cond("sg_cut_in", "between", 995, 1005))) == [1]
    assert ids(read(store, filters=cond("sg_cut_in", "in", 990, None))) == [3, 4]


def test_entity_filters_and_names(store: Store) -> None:
    result = read(store, return_fields=["sg_sequence", "sg_sequence.Sequence.code"],
                  filters=cond("sg_sequence", "is", {"type": "Sequence", "id": 1}))
    assert result["entities"][0] == {"type": "Shot", "id": 1, "sg_sequence": SEQ, "sg_sequence.Sequence.code": "SQ01"}
    assert ids(result) == [1, 3, 4]
    assert ids(read(store, filters=cond("sg_sequence", "is", None))) == [2]
    assert ids(read(store, filters=cond("sg_sequence", "is_not", {"type": "Sequence", "id": 1}))) == [2]
    assert ids(read(store, filters=cond("sg_sequence.Sequence.code", "is", "sq01"))) == [1, 3, 4]


def test_multi_entity_values_and_filters(store: Store) -> None:
    result = read(store, return_fields=["assets"], filters=cond("id", "is", 2))
    assert result["entities"][0]["assets"] == [
        {"type": "Asset", "id": 2, "name": "asset2"}, {"type": "Asset", "id": 3, "name": "asset3"}]
    assert ids(read(store, filters=cond("assets", "is", {"type": "Asset", "id": 3}))) == [2]
    assert ids(read(store, filters=cond("assets", "is", None))) == [3, 4]


def test_retired_link_disappears(own_store: Store) -> None:
    store = own_store
    with store.engine.begin() as conn:
        store.set_retired(conn, "Asset", 3, True, "test")
    result = read(store, return_fields=["assets"], filters=cond("id", "is", 2))
    assert result["entities"][0]["assets"] == [{"type": "Asset", "id": 2, "name": "asset2"}]


def test_a_multi_entity_filter_on_a_retired_entity_matches_no_link(own_store: Store) -> None:
    """One link (its own EXISTS and a registry test made once) and several (one EXISTS) alike."""
    store = own_store
    a2, a3 = {"type": "Asset", "id": 2}, {"type": "Asset", "id": 3}
    assert ids(read(store, filters=cond("assets", "is", a3))) == [2]
    with store.engine.begin() as conn:
        store.set_retired(conn, "Asset", 3, True, "test")
    assert ids(read(store, filters=cond("assets", "is", a3))) == []
    assert ids(read(store, filters=cond("assets", "in", a3))) == []
    assert ids(read(store, filters=cond("assets", "is_not", a3))) == [1, 2, 3, 4]
    assert ids(read(store, filters=cond("assets", "not_in", a3))) == [1, 2, 3, 4]
    assert ids(read(store, filters=cond("assets", "in", a3, a2))) == [2]
    assert ids(read(store, filters=cond("assets", "in", a3, None))) == [3, 4]


def test_or_groups(store: Store) -> None:
    filters = {"logical_operator": "or", "conditions": [
        {"path": "code", "relation": "is", "values": ["sh010"]},
        {"logical_operator": "and", "conditions": [
            {"path": "sg_status_list", "relation": "is", "values": ["ip"]},
            {"path": "sg_cut_in", "relation": "less_than", "values": [1000]}]}]}
    assert ids(read(store, filters=filters)) == [1, 4]


def test_sort_and_paging(store: Store) -> None:
    sorts = [{"field_name": "sg_cut_in", "direction": "desc"}]
    assert ids(read(store, sorts=sorts)) == [2, 1, 4, 3]  # NULL is smallest: last descending
    assert ids(read(store, sorts=[{"field_name": "sg_cut_in", "direction": "asc"}])) == [3, 4, 1, 2]
    page = read(store, paging={"entities_per_page": 3, "current_page": 1}, return_paging_info=True)
    assert ids(page) == [1, 2, 3] and page["paging_info"] == {"entity_count": 4, "has_next_page": True}
    page = read(store, paging={"entities_per_page": 3, "current_page": 2}, return_paging_info_without_counts=True)
    assert ids(page) == [4] and page["paging_info"] == {"has_next_page": False}
    page = read(store, paging={"entities_per_page": 2, "current_page": 1}, return_paging_info_without_counts=True)
    assert page["paging_info"] == {"has_next_page": True}


def test_archived_projects(store: Store) -> None:
    assert ids(read(store, include_archived_projects=False)) == [1, 2, 4]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"type": "Ticket"}, "uncached-type"),
        ({"type": "Step"}, "not-primed"),
        ({"return_fields": ["sg_nope"]}, "uncached-field"),
        ({"return_fields": ["image"]}, "uncached-field"),
        ({"filters": cond("code", "in_last", 1, "DAY")}, "operator"),
        ({"filters": cond("sg_cut_in", "is", "x")}, "filter-value"),
        ({"filters": cond("updated_at", "greater_than", "2024-02-30T00:00:00Z")}, "filter-value"),  # no such day
        ({"filters": cond("updated_at", "less_than", "2024-02-01T25:61:00Z")}, "filter-value"),
        ({"paging": {"entities_per_page": 100000, "current_page": 1}}, "paging"),
        ({"paging": {"entities_per_page": 10, "current_page": -1}}, "paging"),
        ({"additional_filter_presets": [{"preset_name": "LATEST"}]}, "option"),
        ({"return_fields": ["code; DROP TABLE sg_shot"]}, "uncached-field"),
        ({"sorts": [{"field_name": "assets", "direction": "asc"}]}, "sort-type"),
    ],
)
def test_passes_with_a_reason(store: Store, params: dict[str, Any], reason: str) -> None:
    with pytest.raises(Passthrough) as info:
        read(store, **params)
    assert info.value.reason == reason


def test_deeply_nested_filters_pass(store: Store) -> None:
    group: dict[str, Any] = {"path": "id", "relation": "is", "values": [1]}
    for _ in range(100):
        group = {"logical_operator": "and", "conditions": [group]}
    with pytest.raises(Passthrough) as info:
        read(store, filters=group)
    assert info.value.reason == "filter-depth"


def test_rewriting_the_same_rows_changes_nothing(own_store: Store) -> None:
    store = own_store
    with store.engine.begin() as conn:
        before = conn.execute(store.changes.select()).all()
        result = store.write_entities(conn, "Shot", [_full(store, "Shot", {
            "id": 4, "code": "sh040_ü", "sg_cut_in": 990, "sg_sequence": SEQ, "project": PROJECT,
            "sg_status_list": "ip", "assets": []})], "scan", complete=True)
        after = conn.execute(store.changes.select()).all()
    assert result.changed == 0 and len(before) == len(after)


def test_multi_entity_operators(store: Store) -> None:
    a1, a3 = {"type": "Asset", "id": 1}, {"type": "Asset", "id": 3}
    assert ids(read(store, filters=cond("assets", "in", a1, None))) == [1, 3, 4]
    assert ids(read(store, filters=cond("assets", "not_in", a3, None))) == [1]
    assert ids(read(store, filters=cond("assets", "type_is", None))) == [3, 4]
    assert ids(read(store, filters=cond("assets", "type_is_not", "Asset"))) == [3, 4]
    assert ids(read(store, filters=cond("assets", "name_not_contains", "1"))) == [2, 3, 4]
    # SG's reference gives a multi_entity field none of these (an entity field name_is alone): passed
    for relation, value in (("name_is", "ASSET3"), ("name_starts_with", "asset"), ("name_ends_with", "2")):
        for field in ("assets", "sg_sequence"):
            if (field, relation) == ("sg_sequence", "name_is"):
                continue
            with pytest.raises(Passthrough) as info:
                read(store, filters=cond(field, relation, value))
            assert info.value.reason == "operator", (field, relation)
    for field, low, high in (("updated_at", "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z"),):
        with pytest.raises(Passthrough) as info:  # not_between: number and currency only
            read(store, filters=cond(field, "not_between", low, high))
        assert info.value.reason == "operator", field


def test_filter_through_a_multi_entity_hop_is_exists(store: Store) -> None:
    assert ids(read(store, filters=cond("assets.Asset.code", "is", "ASSET2"))) == [2]
    # no linked entity: no match, even for a negation
    assert ids(read(store, filters=cond("assets.Asset.code", "is_not", "asset2"))) == [1, 2]


def test_deep_return_fields_through_and_ending_in_multi_entity(store: Store) -> None:
    result = read(store, type="Sequence", return_fields=["project.Project.users", "project.Project.archived"])
    assert result["entities"] == [{"type": "Sequence", "id": 1, "project.Project.users": [],
                                   "project.Project.archived": False}]
    result = read(store, return_fields=["assets.Asset.code", "project.Project.users"],
                  filters=cond("id", "in", 1, 2))
    assert result["entities"][0] == {"type": "Shot", "id": 1, "assets.Asset.code": None, "project.Project.users": []}
    result = read(store, return_fields=["sg_sequence.Sequence.project.Project.archived"], filters=cond("id", "is", 2))
    assert result["entities"][0]["sg_sequence.Sequence.project.Project.archived"] is None


def test_not_between_leaves_nulls_out(store: Store) -> None:
    assert ids(read(store, filters=cond("sg_cut_in", "not_between", 995, 1005))) == [2, 4]


def test_sort_keys_are_lower_cased_without_a_case_tie_break(store: Store) -> None:
    sorts = [{"field_name": "code", "direction": "asc"}]
    assert ids(read(store, sorts=sorts)) == [3, 1, 2, 4]


def test_empty_or_passes(store: Store) -> None:
    with pytest.raises(Passthrough) as info:
        read(store, filters={"logical_operator": "or", "conditions": []})
    assert info.value.reason == "empty-or"
    assert ids(read(store, filters={"logical_operator": "and", "conditions": []})) == [1, 2, 3, 4]


# -- long value lists and per-read budgets ---------------------------------------------
FAR = range(100_000, 109_900)  # ids no row has: 9,900 values around the matching ones


def test_long_in_lists_are_one_parameter_and_answer_as_short_ones(store: Store) -> None:
    """9,900-value lists (far beyond SQLite's expression depth limit) answer
    exactly what the same filter with only the matching values answers."""
    seq = [{"type": "Sequence", "id": 1}] + [{"type": "Sequence", "id": i} for i in FAR]
    assets = [{"type": "Asset", "id": 2}] + [{"type": "Asset", "id": i} for i in FAR]
    cases = [
        ("sg_sequence", seq, [seq[0]]),
        ("sg_sequence", seq + [None], [seq[0], None]),
        ("sg_sequence", seq + [{"type": "Asset", "id": i} for i in range(50)], [seq[0]]),
        ("assets", assets, [assets[0]]),
        ("assets", assets + [None], [assets[0], None]),
        ("id", [1, 3, *FAR], [1, 3]),
        ("sg_cut_in", [1001, 990, None, *FAR], [1001, 990, None]),
        ("code", ["SH010", "sh040_Ü", *[f"x{i}" for i in FAR]], ["SH010", "sh040_Ü"]),
        ("sg_status_list", ["fin", *[f"s{i}" for i in FAR]], ["fin"]),
        ("sg_sequence.Sequence.code", ["sq01", *[f"x{i}" for i in FAR]], ["sq01"]),
        ("assets.Asset.code", ["ASSET3", *[f"x{i}" for i in FAR]], ["ASSET3"]),
    ]
    for path, long, short in cases:
        for relation in ("in", "not_in"):
            expected = ids(read(store, filters=cond(path, relation, *short)))
            assert ids(read(store, filters=cond(path, relation, *long))) == expected, (path, relation)
    assert ids(read(store, filters=cond("sg_sequence", "in", *seq))) == [1, 3, 4]  # not vacuous


def test_long_lists_bind_one_parameter(store: Store) -> None:
    """The statement's size does not grow with the list."""
    reader = Reader(store)
    with store.engine.connect() as conn:
        replica_state = ReplicaState(store.primed_fields(conn))

    def params(n: int) -> dict[str, Any]:
        return {"type": "Shot", "return_fields": ["code"], "return_only": "active",
                "paging": {"entities_per_page": 500, "current_page": 1},
                "filters": cond("sg_sequence", "in", *[{"type": "Sequence", "id": i} for i in range(n)])}

    small = reader.plan(params(100), replica_state).select.compile(store.engine)
    large = reader.plan(params(9_000), replica_state).select.compile(store.engine)
    assert len(large.params) == len(small.params)
    assert len(str(large)) == len(str(small))


def test_too_many_values_or_link_types_pass(store: Store) -> None:
    from cache import read as read_module

    with pytest.raises(Passthrough) as info:
        read(store, filters=cond("id", "in", *range(read_module.MAX_FILTER_VALUES + 1)))
    assert info.value.reason == "too-large"
    links = [{"type": f"T{i}", "id": i} for i in range(read_module.MAX_INLINE_VALUES * 2)]
    with pytest.raises(Passthrough) as info:
        read(store, filters=cond("sg_sequence", "in", *links))
    assert info.value.reason == "too-large"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_long_lists_of_non_finite_numbers_pass(store: Store, value: float) -> None:
    with pytest.raises(Passthrough) as info:
        read(store, filters=cond("sg_cut_in", "in", value, *range(100)))
    assert info.value.reason in ("filter-value", "db-query-error")


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1" + "0" * 400])
def test_a_float_filter_value_beyond_a_double_passes(own_store: Store, literal: str) -> None:
    """JSON decodes ``1e400`` as infinity and a 401-digit integer as an int no double holds; SG's
    values are finite doubles and what SG answers to such a filter is not known: the read passes,
    where it compared the rows against infinity."""
    with own_store.engine.begin() as conn:
        own_store.write_entities(conn, "Version", [_full(own_store, "Version", {
            "id": 1, "code": "v1", "sg_uploaded_movie_frame_rate": 24.0})], "scan", complete=True)
        own_store.mark_primed(conn, "Version")
    assert ids(read(own_store, type="Version", filters=cond("sg_uploaded_movie_frame_rate", "less_than", 25))) == [1]
    value = fastjson.loads(literal.encode())
    with pytest.raises(Passthrough) as info:
        read(own_store, type="Version", filters=cond("sg_uploaded_movie_frame_rate", "less_than", value))
    assert info.value.reason == "filter-value"


@pytest.mark.parametrize("missing", ["paging", "return_fields", "filters", "return_only"])
def test_reads_the_client_never_sends_pass(store: Store, missing: str) -> None:
    """shotgun_api3 always sends these; SG answers a read without paging with an error."""
    params = {"type": "Shot", "return_fields": ["code"], "return_only": "active",
              "filters": {"logical_operator": "and", "conditions": []},
              "paging": {"entities_per_page": 500, "current_page": 1}}
    del params[missing]
    with store.engine.connect() as conn:
        replica_state = ReplicaState(store.primed_fields(conn))
        with pytest.raises(Passthrough) as info:
            Reader(store).read(conn, params, replica_state)
    assert info.value.reason == "bad-params" and missing in info.value.detail


@pytest.mark.parametrize("paging", [
    {"entities_per_page": 0, "current_page": 1}, {"entities_per_page": -5, "current_page": 1},
    {"entities_per_page": 501, "current_page": 1}, {"entities_per_page": 10**9, "current_page": 1},
    {"entities_per_page": 10, "current_page": 0}, {"entities_per_page": 10, "current_page": -1},
    {"entities_per_page": "10", "current_page": 1}, {"entities_per_page": 10, "current_page": 1.5},
    {"entities_per_page": True, "current_page": 1}, [], "all",
])
def test_absurd_paging_passes(store: Store, paging: Any) -> None:
    with pytest.raises(Passthrough) as info:
        read(store, paging=paging)
    assert info.value.reason in ("paging", "bad-params")


def test_return_fields_not_a_list_passes(store: Store) -> None:
    for value in ("code", {"code": 1}, None, 5):
        with pytest.raises(Passthrough) as info:
            read(store, return_fields=value)
        assert info.value.reason == "bad-params"
