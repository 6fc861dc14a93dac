"""``IN`` lists of any length: short lists inline, long ones as ONE bound parameter, so a list of
30,000 values is neither 30,000 parameters nor a deep expression tree (see :data:`MAX_INLINE_VALUES`)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from ..errors import Passthrough
from .limits import MAX_INLINE_VALUES, MAX_LINK_TYPES

#: The storage classes of values an ``in`` list may hold, as array element types (PostgreSQL).
_ARRAY_TYPES = {"text": sa.Text, "int": sa.BigInteger, "float": sa.Float}


def in_list(dialect: str, expr: Any, values: list[Any], storage: str) -> Any:
    """``expr IN values`` (no None among them): inline for short lists, else one bound
    parameter, so a list of 30,000 values is neither 30,000 parameters nor a deep tree."""
    if len(values) <= MAX_INLINE_VALUES:
        return expr.in_(values)
    if storage not in _ARRAY_TYPES:
        raise Passthrough("filter-value", f"long in list of {storage}")
    return _bound_in(dialect, expr, values, storage)


# dialect: PostgreSQL compares with an ARRAY parameter; SQLite reads a JSON array with json_each().
def _bound_in(dialect: str, expr: Any, values: list[Any], storage: str) -> Any:
    """``expr IN values`` with the whole list bound as one parameter."""
    if dialect == "postgresql":
        array = sa.bindparam(None, values, type_=postgresql.ARRAY(_ARRAY_TYPES[storage]()))
        return expr == sa.any_(array)
    if any(isinstance(v, str) and "\x00" in v for v in values):
        raise Passthrough("filter-value", "NUL in a long in list")
    try:
        text = json.dumps(values, allow_nan=False, ensure_ascii=False)
    except ValueError:
        raise Passthrough("filter-value", "not a finite number") from None
    each = sa.func.json_each(sa.bindparam(None, text, type_=sa.Text)).table_valued("value")
    return expr.in_(sa.select(each.c.value))


def link_in(dialect: str, reg: Any, pairs: list[tuple[str, int]]) -> Any:
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
