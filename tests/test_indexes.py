"""The replica's text-key indexes: present on both databases, added to an older replica on open,
and used by the SQL the read engine emits for text sorts, case-insensitive ``is`` and ``starts_with``.
(The answers' correctness is test_read.py's and test_oracle.py's.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from cache.read import Reader, ReplicaState
from cache.read.scalar_conditions import prefix_range
from cache.replica.schema import Schema
from cache.replica.store import Store, desc_sort_index_name, sort_index_name, text_key_index_name

from .paths import BASIC_SCHEMA

SHOT_KEY = text_key_index_name("Shot", "code")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    st = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    rows = [{"id": i, "code": f"SH{i:04d}" if i % 7 else None, "_retired": False} for i in range(1, 301)]
    with st.engine.begin() as conn:
        conn.execute(st.tables["Shot"].insert(), rows)
        st.mark_primed(conn, "Shot")
    yield st
    st.dispose()


def index_names(st: Store, table: str) -> set[str]:
    with st.engine.connect() as conn:
        return st.dialect.index_names(conn, table)


def test_name_fields_have_a_text_key_index(store: Store) -> None:
    """Every type whose name field is text gets one; a number or link field does not."""
    assert SHOT_KEY in index_names(store, "sg_shot")
    assert text_key_index_name("Task", "content") in index_names(store, "sg_task")
    assert text_key_index_name("Version", "code") in index_names(store, "sg_version")
    assert not any(n.endswith("__key") for n in index_names(store, "sgcache_state"))


def assert_made_again_on_open(store: Store, table: str, index: str) -> None:
    """Drop ``index`` (an older replica without it): the next open of the replica makes it again."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP INDEX {index}")
    assert index not in index_names(store, table)
    again = Store.open(store.engine.url.render_as_string(hide_password=False), store.schema)
    try:
        assert index in index_names(again, table)
    finally:
        again.dispose()


def test_an_older_replica_gets_the_index_on_open(store: Store) -> None:
    assert_made_again_on_open(store, "sg_shot", SHOT_KEY)


def test_date_fields_have_a_sort_index_that_replaces_the_old_one(store: Store) -> None:
    """(field, id) in a read's order; an older replica's single-column index goes on open."""
    new, old = sort_index_name("Shot", "created_at"), "ix_sg_shot_created_at"
    assert new in index_names(store, "sg_shot") and old not in index_names(store, "sg_shot")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP INDEX {new}")
        conn.exec_driver_sql(f"CREATE INDEX {old} ON sg_shot (created_at)")
    again = Store.open(store.engine.url.render_as_string(hide_password=False), store.schema)
    try:
        assert new in index_names(again, "sg_shot") and old not in index_names(again, "sg_shot")
    finally:
        again.dispose()


def test_a_changed_name_field_drops_its_index_with_its_column(store: Store) -> None:
    """SQLite refuses to drop a column an index expression uses: the key index goes first."""
    data = store.schema.to_dict()
    data["entities"]["Shot"]["fields"]["code"] = "number"
    changed = Store.open(store.engine.url.render_as_string(hide_password=False), Schema.from_dict(data))
    try:
        assert SHOT_KEY not in index_names(changed, "sg_shot")
        with changed.engine.connect() as conn:
            assert "code" in {c["name"] for c in sa.inspect(conn).get_columns("sg_shot")}
    finally:
        changed.dispose()


def plan_text(st: Store, params: dict[str, Any], no_sort: bool = False) -> str:
    """The database's plan for the read's SQL (PostgreSQL: with scans, and for a sorted read
    sorts, made costly, as a small table would otherwise not be worth an index; an unsorted read
    is in id order, which the primary key gives without a sort; ``no_sort`` makes sorts costly
    for it too)."""
    params = {"type": "Shot", "return_fields": ["id"], "return_only": "active",
              "filters": {"logical_operator": "and", "conditions": []},
              "paging": {"entities_per_page": 50, "current_page": 1}, **params}
    with st.engine.connect() as conn:
        plan = Reader(st).plan(params, ReplicaState(st.primed_fields(conn)))
        sql = plan.select.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
        text = str(sql).replace("%", "%%")
        if st.dialect.name == "sqlite":
            return "\n".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + text))
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        if params.get("sorts") or no_sort:
            conn.exec_driver_sql("SET LOCAL enable_sort = off")
            conn.exec_driver_sql("SET LOCAL enable_incremental_sort = off")
        return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + text))


def conds(relation: str, value: Any) -> dict[str, Any]:
    return {"filters": {"logical_operator": "and",
                        "conditions": [{"path": "code", "relation": relation, "values": [value]}]}}


@pytest.mark.parametrize("params", [
    {"sorts": [{"field_name": "code", "direction": "asc"}]},
    {"sorts": [{"field_name": "code", "direction": "desc"}]},
    conds("starts_with", "sh01"),
    conds("is", "sh0042"),
], ids=["sort-asc", "sort-desc", "starts_with", "is"])
def test_text_reads_use_the_key_index(store: Store, params: dict[str, Any]) -> None:
    assert SHOT_KEY in plan_text(store, params)


@pytest.mark.parametrize("direction", ["asc", "desc"])
def test_date_sorts_use_the_sort_index(store: Store, direction: str) -> None:
    """Both directions (PostgreSQL: only an index NULLS FIRST gives SG's NULL order either way)."""
    plan = plan_text(store, {"sorts": [{"field_name": "created_at", "direction": direction}]})
    assert sort_index_name("Shot", "created_at") in plan


def test_date_fields_have_a_descending_index_added_on_open(store: Store) -> None:
    """(date descending, id ascending) on date fields, not on date-times (nearly unique: few ties);
    an older replica gets it the first time it is opened."""
    desc = desc_sort_index_name("Task", "due_date")
    assert {desc, desc_sort_index_name("Task", "start_date")} <= index_names(store, "sg_task")
    assert desc_sort_index_name("Shot", "created_at") not in index_names(store, "sg_shot")
    assert_made_again_on_open(store, "sg_task", desc)


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection")  # the text key index, on SQLite
def test_a_changed_date_field_drops_its_descending_index(store: Store) -> None:
    """A field whose type changes is re-created: its indexes go with its column (and a text
    field gets no descending index)."""
    data = store.schema.to_dict()
    data["entities"]["Task"]["fields"]["due_date"] = "text"
    changed = Store.open(store.engine.url.render_as_string(hide_password=False), Schema.from_dict(data))
    try:
        assert desc_sort_index_name("Task", "due_date") not in index_names(changed, "sg_task")
        assert desc_sort_index_name("Task", "start_date") in index_names(changed, "sg_task")
    finally:
        changed.dispose()


def test_a_descending_date_sort_uses_the_descending_index(store: Store) -> None:
    with store.engine.begin() as conn:
        store.mark_primed(conn, "Task")
    sort = [{"field_name": "due_date", "direction": "desc"}]
    assert desc_sort_index_name("Task", "due_date") in plan_text(store, {"type": "Task", "sorts": sort})
    sort = [{"field_name": "due_date", "direction": "asc"}]
    assert sort_index_name("Task", "due_date") in plan_text(store, {"type": "Task", "sorts": sort})


def _task_pages(st: Store, direction: str, per_page: int) -> list[tuple[int, str | None]]:
    """Every page of Tasks sorted by due_date, as (id, due_date)."""
    reader, out, page = Reader(st), [], 1
    with st.engine.connect() as conn:
        state = ReplicaState(st.primed_fields(conn))
        while True:
            got = reader.read(conn, {
                "type": "Task", "return_fields": ["due_date"], "return_only": "active",
                "filters": {"logical_operator": "and", "conditions": []},
                "sorts": [{"field_name": "due_date", "direction": direction}],
                "paging": {"entities_per_page": per_page, "current_page": page}}, state)
            out += [(e["id"], e["due_date"]) for e in got["entities"]]
            if not got["paging_info"]["has_next_page"]:
                return out
            page += 1


@pytest.mark.parametrize("direction", ["asc", "desc"])
def test_date_sorts_answer_the_same_with_or_without_the_indexes(store: Store, direction: str) -> None:
    """Ties (many Tasks a day) by id ascending in both directions, NULL first ascending and last
    descending: SG's order (docs/semantics.md), by every page, with the date indexes and without."""
    days = ["2025-01-03", "2025-01-01", None, "2025-02-10", "2025-01-03"]
    rows = [{"id": i, "due_date": days[(i * 7) % 5], "_retired": i % 11 == 0} for i in range(1, 241)]
    with store.engine.begin() as conn:
        conn.execute(store.tables["Task"].insert(), rows)
        store.mark_primed(conn, "Task")
    live = [(r["id"], r["due_date"]) for r in rows if not r["_retired"]]
    by_id = sorted(live)
    dated = sorted((r for r in by_id if r[1] is not None), key=lambda r: r[1], reverse=direction == "desc")
    nulls = [r for r in by_id if r[1] is None]
    want = nulls + dated if direction == "asc" else dated + nulls
    assert _task_pages(store, direction, 17) == want
    with store.engine.begin() as conn:
        for name in (sort_index_name("Task", "due_date"), desc_sort_index_name("Task", "due_date")):
            conn.exec_driver_sql(f"DROP INDEX {name}")
    assert _task_pages(store, direction, 17) == want


def page_part(plan: str) -> str:
    """The plan of the page's subquery (what filters, sorts and pages the rows)."""
    lines = plan.splitlines()
    if any(line.strip().startswith(("MATERIALIZE page", "CO-ROUTINE page")) for line in lines):  # SQLite
        start = next(i for i, line in enumerate(lines) if line.strip().startswith(("MATERIALIZE", "CO-ROUTINE")))
        end = next(i for i, line in enumerate(lines) if line.strip().startswith("SCAN page"))
        return "\n".join(lines[start:end])
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("->  Limit"))  # PostgreSQL
    depth = len(lines[start]) - len(lines[start].lstrip())
    part = [lines[start]]
    for line in lines[start + 1:]:
        if len(line) - len(line.lstrip()) <= depth:
            break
        part.append(line)
    return "\n".join(part)


@pytest.mark.parametrize(("entity_type", "params"), [
    ("Shot", {"sorts": [{"field_name": "code", "direction": "asc"}]}),
    ("Shot", {"sorts": [{"field_name": "created_at", "direction": "asc"}]}),
    ("Task", {"sorts": [{"field_name": "due_date", "direction": "asc"}]}),
    ("Task", {"sorts": [{"field_name": "due_date", "direction": "desc"}]}),
    ("Shot", conds("contains", "sh01")),
], ids=["code-asc", "date-time-asc", "date-asc", "date-desc", "contains-by-id"])
def test_an_indexed_order_is_walked_without_sorting_ties(store: Store, entity_type: str,
                                                          params: dict[str, Any]) -> None:
    """The index gives the whole order, ties by id included, so a page stops at its last row
    (PostgreSQL: the ORDER BY's ``id`` has no NULLS clause: ``id NULLS FIRST`` matched no index,
    and every tie, or for a ``contains`` the whole table, was sorted). Not a name field descending:
    its ties (equal names, NULLs) are still sorted by id (docs/scale.md)."""
    with store.engine.begin() as conn:
        store.mark_primed(conn, "Task")
    part = page_part(plan_text(store, {"type": entity_type, **params}, no_sort=True))
    assert "Sort" not in part and "TEMP B-TREE" not in part, part


@pytest.mark.parametrize(("prefix", "low", "high"), [
    ("sh01", "sh01", "sh02"),
    ("a\U0010ffff", "a\U0010ffff", "b"),
    ("\U0010ffff", "\U0010ffff", None),
    ("x\ud7ff", "x\ud7ff", "x\ue000"),
])
def test_prefix_range_bounds_every_string_with_the_prefix(prefix: str, low: str, high: str | None) -> None:
    bounds = prefix_range(sa.column("k"), prefix)
    values = [b.right.value for b in bounds]
    assert values == [low] + ([high] if high is not None else [])
    for s in (prefix, prefix + "\U0010ffff", prefix + "z"):  # code-point order: Python's own
        assert s >= low and (high is None or s < high)


def test_a_deep_link_filter_starts_from_the_link_index(store: Store) -> None:
    """``entity.Shot.sg_sequence is X`` on Tasks: the Shots of X by their link index (the test on
    the hop's own link columns makes its LEFT JOIN inner: SQLite does not infer it), not every Task."""
    with store.engine.begin() as conn:
        store.mark_primed(conn, "Task")
        store.mark_primed(conn, "Sequence")
    params = {"type": "Task", "filters": {"logical_operator": "and", "conditions": [
        {"path": "entity.Shot.sg_sequence", "relation": "is", "values": [{"type": "Sequence", "id": 3}]}]}}
    assert "ix_sg_shot_sg_sequence__id" in plan_text(store, params)


def test_an_empty_prefix_has_no_range() -> None:
    assert prefix_range(sa.column("k"), "") == []


class ShotsSG:
    """``find`` as a full scan calls it: ``id greater_than`` keyset pages of 30 Shots (none has an
    ``updated_at``: the watermark's question and any other finds nothing)."""

    def find(self, entity_type: str, filters: list[Any], fields: list[str] | None = None, order: Any = None,
             limit: int = 0, retired_only: bool = False, **_: Any) -> list[dict[str, Any]]:
        after = next((f[2] for f in filters if f[:2] == ["id", "greater_than"]), None)
        if retired_only or entity_type != "Shot" or after is None:
            return []
        return [{"type": "Shot", "id": i, **{f: None for f in fields or [] if f != "id"}, "code": f"s{i}"}
                for i in range(after + 1, min(31, after + 1 + limit))]


def test_a_full_scan_refreshes_the_planner_statistics(db_url: str) -> None:
    """ANALYZE of the type's tables, not of the others (PostgreSQL: a never-analyzed table has
    reltuples -1; SQLite: rows in sqlite_stat1)."""
    from cache.scan.scanner import Scanner

    st = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    try:
        assert Scanner(st, ShotsSG(), page_size=30).full_scan("Shot").primed
        with st.engine.connect() as conn:
            if st.dialect.name == "postgresql":
                tuples = dict(conn.exec_driver_sql(
                    "SELECT relname, reltuples FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
                    " AND relname IN ('sg_shot', 'sgcache_entities', 'sg_task')").all())
                assert tuples == {"sg_shot": 30, "sgcache_entities": 30, "sg_task": -1}
            else:
                analyzed = {r[0] for r in conn.exec_driver_sql("SELECT tbl FROM sqlite_stat1")}
                assert {"sg_shot", "sgcache_entities"} <= analyzed and "sg_task" not in analyzed
    finally:
        st.dispose()


def test_a_multi_entity_filter_runs_without_parallel_workers(store: Store) -> None:
    """PostgreSQL planned a page with an EXISTS probe per row as a parallel walk whose workers
    took longer to start than the walk: such a read sets ``max_parallel_workers_per_gather`` to 0
    for its transaction only; other reads leave it alone."""
    with store.engine.begin() as conn:
        store.mark_primed(conn, "Task")
        store.mark_primed(conn, "HumanUser")

    def read(conditions: list[dict[str, Any]]) -> tuple[bool, str | None, str | None]:
        reader = Reader(store)
        params = {"type": "Task", "return_fields": ["content"], "return_only": "active",
                  "filters": {"logical_operator": "and", "conditions": conditions},
                  "sorts": [{"field_name": "due_date", "direction": "asc"}],
                  "paging": {"entities_per_page": 10, "current_page": 1}}
        with store.engine.connect() as conn:
            state = ReplicaState(store.primed_fields(conn))
            plan = reader.plan(params, state)
            reader.read(conn, params, state)
            if store.dialect.name != "postgresql":
                return plan.serial, None, None
            during = conn.exec_driver_sql("SHOW max_parallel_workers_per_gather").scalar()
            conn.rollback()
            after = conn.exec_driver_sql("SHOW max_parallel_workers_per_gather").scalar()
            return plan.serial, during, after

    assignee = {"path": "task_assignees", "relation": "is", "values": [{"type": "HumanUser", "id": 7}]}
    serial, during, after = read([assignee])
    assert serial
    if store.dialect.name == "postgresql":
        assert during == "0" and after != "0"
    serial, during, after = read([{"path": "content", "relation": "is", "values": ["comp"]}])
    assert not serial and during == after
