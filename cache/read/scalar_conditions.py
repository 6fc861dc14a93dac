"""Filter conditions on a field stored in a column: text, numbers, dates, checkboxes.

The rules (case, NULLs, ranges) are docs/semantics.md's; the fake SG follows the same ones.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import sqlalchemy as sa

from ..errors import Passthrough
from ..replica import fieldtypes
from ..replica.schema import FieldSchema
from ..replica.store import Store
from .collation import CASE_INSENSITIVE, check_case_mapping, like_pattern
from .inlists import in_list
from .relative import RELATIVE, RelativeDates

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def filter_value(fschema: FieldSchema, value: Any) -> Any:
    """A filter value as stored, or Passthrough when its shape is not the field's."""
    if value is None:
        return None
    dt = fschema.data_type
    if dt == "date" and not (isinstance(value, str) and _DATE_RE.match(value) and _real_date(value)):
        # 2024-02-30 has the shape but is no day: SG refuses it, and compared as text it would match
        raise Passthrough("filter-value", f"date {value!r}"[:60])
    if dt == "date_time" and not (isinstance(value, str) and _DATETIME_RE.match(value)):
        raise Passthrough("filter-value", f"date_time {value!r}"[:60])
    try:
        return fieldtypes.encode_scalar(dt, value)
    except ValueError as exc:
        raise Passthrough("filter-value", str(exc)[:60]) from None


def _real_date(text: str) -> bool:
    """Whether ``YYYY-MM-DD`` names a day of the calendar."""
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def scalar_condition(store: Store, col: Any, fschema: FieldSchema, relation: str, values: list[Any],
                     relative: RelativeDates | None = None) -> Any:
    """``col <relation> values`` for a field of ``fschema``'s type (relative dates need ``relative``:
    without a time zone they pass, ``operator``). Text is lowered on both sides by the replica's
    dialect (``lower`` the column, ``lower_value`` the filter's value), the same way."""
    dialect = store.dialect
    if relation in RELATIVE:
        if relative is None:
            raise Passthrough("operator", f"{relation} (no sgcache_timezone)")
        return relative_condition(col, relative, fschema, relation, values)
    ci = fschema.data_type in CASE_INSENSITIVE

    def norm(expr: Any) -> Any:
        # text_key: lower() in code-point order, the expression the key index holds (equality
        # is the same in every deterministic collation, the only kind a database default can be)
        if not ci:
            return expr
        check_case_mapping(store)
        return dialect.text_key(expr)

    def lit(v: Any) -> Any:
        v = filter_value(fschema, v)
        return dialect.lower_value(v) if ci and isinstance(v, str) else v

    if relation in ("is", "is_not"):
        if len(values) != 1:
            raise Passthrough("filter-value", f"{relation} takes one value")
        value = lit(values[0])
        if fschema.data_type == "checkbox":
            if value is None:
                raise Passthrough("filter-value", "checkbox None")
            match = col == value
        elif value is None:
            match = col.is_(None)
            return match if relation == "is" else sa.not_(match)
        else:
            match = norm(col) == value
        if relation == "is":
            return match
        return sa.or_(col.is_(None), sa.not_(match))
    if relation in ("in", "not_in"):
        lits = [lit(v) for v in values]
        non_null = [v for v in lits if v is not None]
        storage = fieldtypes.TYPES[fschema.data_type].storage
        match = in_list(dialect, norm(col), non_null, storage) if non_null else sa.false()
        if None in lits:
            match = sa.or_(match, col.is_(None))
        if relation == "in":
            return match
        if None in lits:
            return sa.not_(match)
        return sa.or_(col.is_(None), sa.not_(match))
    if relation in ("contains", "not_contains", "starts_with", "ends_with"):
        if len(values) != 1 or not isinstance(values[0], str):
            raise Passthrough("filter-value", relation)
        check_case_mapping(store)
        text = dialect.lower_value(values[0])
        match = dialect.lower(col).like(like_pattern(relation, text), escape="\\")
        if relation == "not_contains":
            return sa.or_(col.is_(None), sa.not_(match))
        if relation == "starts_with":
            match = sa.and_(*prefix_range(dialect.text_key(col), text), match)
        return sa.and_(col.is_not(None), match)
    if relation in ("less_than", "greater_than"):
        if len(values) != 1 or values[0] is None:
            raise Passthrough("filter-value", relation)
        value = lit(values[0])
        return col < value if relation == "less_than" else col > value
    if relation in ("between", "not_between"):
        if len(values) != 2 or (values[0] is None and values[1] is None):
            raise Passthrough("filter-value", relation)
        lo, hi = lit(values[0]), lit(values[1])
        parts = []
        if lo is not None:
            parts.append(col >= lo)
        if hi is not None:
            parts.append(col <= hi)
        inside = sa.and_(*parts)
        if relation == "between":
            return sa.and_(col.is_not(None), inside)
        # NULL is neither inside nor outside the range (as SQL's NOT BETWEEN; the fake SG agrees)
        return sa.and_(col.is_not(None), sa.not_(inside))
    raise Passthrough("operator", relation)


def prefix_range(key: Any, prefix: str) -> list[Any]:
    """``key`` between ``prefix`` and the next prefix in code-point order: implied by ``LIKE
    'prefix%'`` (so adding it changes no answer) and, unlike LIKE, a range an index on ``key`` serves."""
    if not prefix:
        return []
    bounds = [key >= prefix]
    head = prefix
    while head and ord(head[-1]) == 0x10FFFF:
        head = head[:-1]  # nothing follows U+10FFFF: carry to the character before
    if head:
        nxt = ord(head[-1]) + 1
        nxt = 0xE000 if 0xD800 <= nxt <= 0xDFFF else nxt  # surrogates are not characters
        bounds.append(key < head[:-1] + chr(nxt))
    return bounds


def relative_condition(col: Any, relative: RelativeDates, fschema: FieldSchema, relation: str,
                       values: list[Any]) -> Any:
    """A relative-date filter as a range of the stored text (cache/read/relative.py)."""
    try:
        w = relative.window(relation, values, fschema.data_type)
    except (ValueError, OverflowError) as exc:  # a window past year 9999
        raise Passthrough("filter-value", f"{relation}: {exc}"[:60]) from None
    inside = sa.and_(col >= w.lo, col <= w.hi if w.hi_included else col < w.hi)
    if w.negate:
        return sa.and_(col.is_not(None), sa.not_(inside))
    return sa.and_(col.is_not(None), inside)
