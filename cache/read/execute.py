"""Running a plan: the page's statement, one query per multi_entity return field, the count."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import Passthrough
from ..replica.store import Store
from .budget import ReadBudget
from .plan import Plan


def run_plan(conn: Connection, store: Store, plan: Plan, budget: ReadBudget | None = None) -> dict[str, Any]:
    """Run a plan (each statement within ``budget`` when given); the value of ``results``."""
    if plan.archived_guard:
        check_retired_archived(conn, store)
    if budget is not None:
        budget.before_statement(conn)
    if plan.serial:
        store.dialect.serial_plans(conn)
    result = conn.execute(plan.select)
    decode = plan.decoder(tuple(result.keys()))
    rows = result.all()
    # One row past the page tells whether there is a next page.
    has_next = len(rows) > plan.limit
    rows = rows[: plan.limit]
    entities = [decode(row) for row in rows]
    if plan.multi_fields and entities:
        _fill_multi(conn, store, plan, entities, rows, budget)
    paging_info: dict[str, Any] = {"has_next_page": has_next}
    if plan.want_count:
        if budget is not None:
            budget.before_statement(conn)
        paging_info["entity_count"] = int(conn.execute(plan.count_select).scalar_one())
    return {"entities": entities, "paging_info": paging_info}


def check_retired_archived(conn: Connection, store: Store) -> None:
    """Passthrough while a retired Project is archived. SG shows a link to a retired entity as None, so
    a row the replica read after the Project was retired does not hold it, and whether SG's
    ``include_archived_projects: false`` leaves out the rows of a retired archived Project is not
    documented (the fake SG does, by the link it stored)."""
    project = store.tables["Project"]
    found = conn.execute(
        sa.select(project.c.id).where(project.c._retired, sa.func.coalesce(project.c.archived, False)).limit(1)
    ).first()
    if found is not None:
        raise Passthrough("retired-archived-project", f"Project {found[0]} is retired and archived")


def _fill_multi(
    conn: Connection, store: Store, plan: Plan, entities: list[dict[str, Any]], rows: list[Any],
    budget: ReadBudget | None = None,
) -> None:
    """One query per multi_entity return field, for all the rows of the page."""
    for multi in plan.multi_fields:
        if multi.parent_label is None:  # a field of the row itself
            parents = [e["id"] for e in entities]
        else:  # the field of a linked row (deep path); no linked row reads as None
            parents = [row._mapping[multi.parent_label] for row in rows]
        if budget is not None:
            budget.before_statement(conn)
        values = _multi_values(conn, store, multi.owner_type, multi.field_name, {p for p in parents if p is not None})
        for e, parent in zip(entities, parents, strict=True):
            e[multi.key] = None if parent is None else list(values.get(parent, ()))


def _multi_values(
    conn: Connection, store: Store, owner_type: str, fname: str, parent_ids: set[int]
) -> dict[int, list[dict[str, Any]]]:
    """The live linked entities of ``owner_type.fname`` for each parent, in SG's order."""
    out: dict[int, list[dict[str, Any]]] = {}
    if not parent_ids:
        return out
    assoc = store.multi[(owner_type, fname)]
    reg = store.entities
    stmt = (
        sa.select(assoc.c.parent_id, reg.c.type, reg.c.id, reg.c.name, reg.c.name_known)
        .select_from(
            assoc.join(
                reg,
                (reg.c.type == assoc.c.child_type)
                & (reg.c.id == assoc.c.child_id)
                & sa.not_(reg.c.retired),
            )
        )
        .where(assoc.c.parent_id.in_(sorted(parent_ids)))
        .order_by(assoc.c.parent_id, assoc.c.pos)
    )
    for row in conn.execute(stmt):
        if not row.name_known:
            raise Passthrough("link-name-unknown", f"{row.type} {row.id}")
        out.setdefault(row.parent_id, []).append({"type": row.type, "id": row.id, "name": row.name})
    return out
