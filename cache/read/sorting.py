"""Sorts and paging: the order a read's rows come in, and which page of them it answers.

NULL is the smallest value; text-like types sort by their lower-cased value in code-point
order; ties end with id ascending (docs/semantics.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import sqlalchemy as sa

from ..errors import Passthrough
from ..replica import fieldtypes
from .collation import SORT_LOWER, check_case_mapping
from .limits import MAX_OFFSET, MAX_PAGE_SIZE
from .paths import PathResolver, Scope


class Page(NamedTuple):
    """Which rows a read answers."""

    limit: int  # rows per page
    offset: int
    want_count: bool  # return_paging_info: the answer carries the filtered total


def sort_keys(scope: Scope, paths: PathResolver, sorts: Any) -> list[tuple[Any, str]]:
    """The sort keys of ``scope``'s rows as (expression, direction), ending with id ascending
    (direction :data:`KEY`)."""
    dialect = scope.store.dialect
    order: list[tuple[Any, str]] = []
    if sorts is None:
        sorts = []
    if not isinstance(sorts, list):
        raise Passthrough("bad-params", "sorts")
    for sort in sorts:
        if not isinstance(sort, Mapping):
            raise Passthrough("bad-params", "sort")
        direction = sort.get("direction", "asc")
        if direction not in ("asc", "desc"):
            raise Passthrough("bad-params", "sort direction")
        resolved = paths.walk(scope, sort.get("field_name"))
        alias, fschema = resolved.alias, resolved.field
        info = fieldtypes.TYPES[fschema.data_type]
        if not info.sortable:
            raise Passthrough("sort-type", fschema.data_type)
        if alias is None:
            continue  # through a multi_entity hop every value is None: the key changes nothing
        if info.storage == "entity" or fschema.data_type in SORT_LOWER:
            check_case_mapping(scope.store)  # lower-cased text: the database's lower() must be SG's
        if info.storage == "entity":
            # by the linked entity's name, case-insensitively; a nameless entity sorts as ""
            reg = scope.link(alias, fschema.name)
            expr = sa.case((reg.c.id.is_(None), sa.null()), else_=sa.func.coalesce(dialect.lower(reg.c.name), ""))
        elif fschema.data_type in SORT_LOWER:
            expr = dialect.text_key(alias.c[fschema.name])  # what the name field's key index holds
        elif fschema.data_type == "checkbox":
            expr = sa.func.coalesce(alias.c[fschema.name], False)  # unset (or no linked row) reads false
        else:
            expr = alias.c[fschema.name]
        if info.storage == "entity":
            expr = dialect.codepoint_order(expr)
        order.append((expr, direction))
    order.append((scope.base.c.id, KEY))
    return order


#: The direction of the last key, the row's id: ascending, and never NULL, so it carries no NULLS
#: clause (PostgreSQL matches an ORDER BY with an index only when the NULLS order agrees, and
#: indexes end with a plain ``id``: ``id NULLS FIRST`` left a sort of every tie over the index).
KEY = "key"


def ordered(expr: Any, direction: str) -> Any:
    """NULL is the smallest value: first ascending, last descending (see docs/semantics.md)."""
    if direction == KEY:
        return expr.asc()
    return expr.asc().nulls_first() if direction == "asc" else expr.desc().nulls_last()


def page_of(params: Mapping[str, Any]) -> Page:
    """The page a read asks for (``paging``, ``return_paging_info``), or Passthrough."""
    paging = params.get("paging", {"entities_per_page": MAX_PAGE_SIZE, "current_page": 1})
    if not isinstance(paging, Mapping):
        raise Passthrough("bad-params", "paging")
    per_page = paging.get("entities_per_page", MAX_PAGE_SIZE)
    page = paging.get("current_page", 1)
    for value in (per_page, page):
        if not isinstance(value, int) or isinstance(value, bool):
            raise Passthrough("paging", "not an integer")
    if not 1 <= per_page <= MAX_PAGE_SIZE or page < 1 or (page - 1) * per_page > MAX_OFFSET:
        raise Passthrough("paging", f"{per_page}x{page}")
    want_count = params.get("return_paging_info") is True
    without = params.get("return_paging_info_without_counts")
    for flag in (params.get("return_paging_info"), without):
        if flag not in (None, True, False):
            raise Passthrough("bad-params", "paging flag")
    return Page(per_page, (page - 1) * per_page, want_count)
