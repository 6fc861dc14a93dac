"""How text compares and sorts, as SG does: lower case over all of Unicode and code-point order
(both per database: :meth:`cache.replica.dialect.Dialect.lower`, :meth:`~cache.replica.dialect.Dialect.codepoint_order`),
and LIKE patterns whose ``%``, ``_`` and ``\\`` are literal (see docs/semantics.md)."""

from __future__ import annotations

from ..replica.fieldtypes import LOWER_SORTED

#: Types whose sort key is the lower-cased text (the rule the fake SG shares; docs/semantics.md).
SORT_LOWER = LOWER_SORTED
#: Types matched case-insensitively by filters (the other text-like types match exactly).
CASE_INSENSITIVE = {"text"}
#: The LIKE pattern of each text-matching relation, around the escaped value.
_PATTERNS = {
    "contains": "%{}%",
    "not_contains": "%{}%",
    "starts_with": "{}%",
    "ends_with": "%{}",
    "name_contains": "%{}%",
    "name_not_contains": "%{}%",
    "name_starts_with": "{}%",
    "name_ends_with": "%{}",
}


def like_pattern(relation: str, text: str) -> str | None:
    """The LIKE pattern (escape ``\\``) of a text-matching relation on ``text``; None for
    another relation."""
    form = _PATTERNS.get(relation)
    return None if form is None else form.format(escape_like(text))


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
