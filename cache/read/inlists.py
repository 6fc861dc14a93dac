"""``IN`` lists of any length: short lists inline, long ones as ONE bound parameter, so a list of
30,000 values is neither 30,000 parameters nor a deep expression tree (see :data:`MAX_INLINE_VALUES`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..errors import Passthrough
from ..replica.dialect import Dialect
from .limits import MAX_INLINE_VALUES, MAX_LINK_TYPES


def in_list(dialect: Dialect, expr: Any, values: list[Any], storage: str) -> Any:
    """``expr IN values`` (no None among them): inline for short lists, else one bound
    parameter, so a list of 30,000 values is neither 30,000 parameters nor a deep tree."""
    if len(values) <= MAX_INLINE_VALUES:
        return expr.in_(values)
    return dialect.bound_in(expr, values, storage)


def link_in(dialect: Dialect, reg: Any, pairs: list[tuple[str, int]]) -> Any:
    """The registry row ``reg`` is one of ``pairs`` (type, id). A long list is grouped by
    type: one ``type = t AND id IN (...)`` per type, each id list bound as one parameter."""
    if len(pairs) <= MAX_INLINE_VALUES:
        return sa.or_(*[(reg.c.type == t) & (reg.c.id == i) for t, i in pairs])
    by_type: dict[str, list[int]] = {}
    for t, i in pairs:
        by_type.setdefault(t, []).append(i)
    if len(by_type) > MAX_LINK_TYPES:
        raise Passthrough("too-large", f"links of more than {MAX_LINK_TYPES} types")
    return sa.or_(*[(reg.c.type == t) & in_list(dialect, reg.c.id, ids, "int") for t, ids in by_type.items()])
