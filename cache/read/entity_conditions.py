"""Filter conditions on links: entity fields (through the registry's live row) and multi_entity
fields (EXISTS over the association table), including ``type_is`` and ``name_*``.

A link to a retired entity reads as no link; the rules are docs/semantics.md's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from ..errors import Passthrough
from ..replica.schema import FieldSchema
from ..replica.store import Store
from .collation import check_case_mapping, like_pattern
from .inlists import link_in
from .paths import Scope


def entity_condition(
    store: Store, scope: Scope, alias: Any, fschema: FieldSchema, relation: str, values: list[Any]
) -> Any:
    """An entity field ``alias.<field>``: its live link (LEFT JOINed in ``scope``) against ``values``."""
    dialect = store.dialect
    reg = scope.link(alias, fschema.name)
    linked = reg.c.id.is_not(None)
    if relation in ("is", "is_not", "in", "not_in"):
        if relation in ("is", "is_not") and len(values) != 1:
            raise Passthrough("filter-value", relation)
        links = [link_value(v) for v in values]
        pairs = [p for p in links if p is not None]
        match = link_in(dialect, reg, pairs) if pairs else sa.false()
        if None in links:
            match = sa.or_(match, reg.c.id.is_(None))
        elif relation in ("is", "in") and len(pairs) == 1:
            # the same test on the row's own link columns: implied by the registry join (so no
            # answer changes; the read engine never negates an is/in condition it returns), it lets
            # the planner start from the link's index, and turns a deep path's LEFT JOIN inner
            (t, i), = pairs
            match = sa.and_(alias.c[f"{fschema.name}__type"] == t, alias.c[f"{fschema.name}__id"] == i, match)
        if relation in ("is", "in"):
            return match
        return sa.or_(reg.c.id.is_(None), sa.not_(match)) if None not in links else sa.not_(match)
    if relation in ("type_is", "type_is_not"):
        if len(values) != 1:
            raise Passthrough("filter-value", relation)
        value = values[0]
        if value is None:
            match = reg.c.id.is_(None)
            return match if relation == "type_is" else sa.not_(match)
        if not isinstance(value, str):
            raise Passthrough("filter-value", relation)
        if relation == "type_is":
            return reg.c.type == value
        return sa.or_(reg.c.id.is_(None), reg.c.type != value)
    _check_names_known(store, fschema)
    test = _name_test(store, relation, values, reg.c.name)
    if relation == "name_not_contains":
        return sa.not_(sa.and_(linked, test))
    return sa.and_(linked, test)


def multi_condition(store: Store, alias: Any, fschema: FieldSchema, relation: str, values: list[Any]) -> Any:
    """multi_entity: is/in mean "one of the linked entities is"; the negations are NOT of that."""
    dialect = store.dialect
    assoc = store.multi[(fschema.entity_type, fschema.name)].alias()
    reg = store.entities.alias()
    base = (
        sa.select(sa.literal(1))
        .select_from(
            assoc.join(
                reg,
                (reg.c.type == assoc.c.child_type) & (reg.c.id == assoc.c.child_id) & sa.not_(reg.c.retired),
            )
        )
        .where(assoc.c.parent_id == alias.c.id)
    )
    empty = ~sa.exists(base)
    if relation in ("is", "is_not", "in", "not_in"):
        if relation in ("is", "is_not") and len(values) != 1:
            raise Passthrough("filter-value", relation)
        links = [link_value(v) for v in values]
        pairs = [p for p in links if p is not None]
        parts = []
        if len(pairs) == 1:
            parts.append(_links_to(store, assoc, alias, *pairs[0]))
        elif pairs:
            parts.append(sa.exists(base.where(link_in(dialect, reg, pairs))))
        if None in links:
            parts.append(empty)
        hit = sa.or_(*parts) if parts else sa.false()
        return hit if relation in ("is", "in") else sa.not_(hit)
    if relation in ("type_is", "type_is_not"):
        if len(values) != 1 or not (values[0] is None or isinstance(values[0], str)):
            raise Passthrough("filter-value", relation)
        hit = empty if values[0] is None else sa.exists(base.where(reg.c.type == values[0]))
        return hit if relation == "type_is" else sa.not_(hit)
    _check_names_known(store, fschema)
    hit = sa.exists(base.where(_name_test(store, relation, values, reg.c.name)))
    return sa.not_(hit) if relation == "name_not_contains" else hit


def _links_to(store: Store, assoc: Any, alias: Any, link_type: str, link_id: int) -> Any:
    """``alias``'s multi_entity field (table ``assoc``) links to the live entity (type, id).

    The registry's test does not depend on the row, so it is a test of its own, made once per
    read (PostgreSQL: an InitPlan; SQLite: a constant subquery); inside the row's EXISTS it made
    each row's probe look expensive, and PostgreSQL read every Task and sorted them (110 ms at a
    million rows) instead of walking the sort's index and probing the links (4 ms)."""
    reg = store.entities.alias()
    linked = sa.select(sa.literal(1)).select_from(assoc).where(
        assoc.c.parent_id == alias.c.id, assoc.c.child_type == link_type, assoc.c.child_id == link_id)
    live = sa.select(sa.literal(1)).select_from(reg).where(
        reg.c.type == link_type, reg.c.id == link_id, sa.not_(reg.c.retired))
    return sa.and_(sa.exists(linked), sa.exists(live))


def link_value(value: Any) -> tuple[str, int] | None:
    """A filter's link value as (type, id), None for None; Passthrough for another shape."""
    if type(value) is dict:  # the common shape, checked cheaply (30,000-link lists)
        t, i = value.get("type"), value.get("id")
        if type(t) is str and type(i) is int:
            return t, i
    if value is None:
        return None
    if (
        not isinstance(value, Mapping)
        or not isinstance(value.get("type"), str)
        or not isinstance(value.get("id"), int)
        or isinstance(value.get("id"), bool)
    ):
        raise Passthrough("filter-value", "entity value")
    return value["type"], value["id"]


def _check_names_known(store: Store, fschema: FieldSchema) -> None:
    """name_* filters need every linkable type's names to be known."""
    for link_type in fschema.links or ("*",):
        entity = store.schema.entities.get(link_type)
        if entity is None or entity.name_field not in entity.fields:
            raise Passthrough("name-filter", f"{fschema.entity_type}.{fschema.name}")


def _name_test(store: Store, relation: str, values: list[Any], name: Any) -> Any:
    """name_* on one linked name (a link whose entity has no name counts as ""), both sides
    lowered the same way."""
    if len(values) != 1 or not isinstance(values[0], str):
        raise Passthrough("filter-value", relation)
    check_case_mapping(store)
    dialect = store.dialect
    text = dialect.lower_value(values[0])
    name = sa.func.coalesce(dialect.lower(name), "")
    if relation == "name_is":
        return name == text
    pattern = like_pattern(relation, text) if relation.startswith("name_") else None
    if pattern is None:
        raise Passthrough("operator", relation)
    return name.like(pattern, escape="\\")
