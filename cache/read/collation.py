"""How text compares and sorts, as SG does: lower case over all of Unicode, code-point order,
and LIKE patterns whose ``%``, ``_`` and ``\\`` are literal (see docs/semantics.md)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

#: Types whose sort key is the lower-cased text (the rule the fake SG shares; docs/semantics.md).
SORT_LOWER = {"text", "entity_type", "color", "uuid", "list", "status_list", "footage"}
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


# dialect: SQLite's lower() is ASCII-only (sg_lower() is registered by cache/store.py); PostgreSQL's is not.
def lower(dialect: str, expr: Any) -> Any:
    """Lower case over all of Unicode, as SG compares text. SQLite's own lower() is ASCII-only
    but runs in C: it is used for ASCII values (as many bytes as characters), the registered
    Python sg_lower() for the others."""
    if dialect != "sqlite":
        return sa.func.lower(expr)
    non_ascii = sa.func.length(sa.cast(expr, sa.LargeBinary)) != sa.func.length(expr)  # bytes vs chars
    return sa.case((non_ascii, sa.func.sg_lower(expr)), else_=sa.func.lower(expr))


# dialect: PostgreSQL orders text by its collation; SQLite's default (binary) is code-point order already.
def codepoint_order(dialect: str, expr: Any) -> Any:
    """Text sorts by code point whatever the database's collation (SQLite's is binary
    already; a PostgreSQL created with a linguistic locale would order differently)."""
    return expr.collate("C") if dialect == "postgresql" else expr


def like_pattern(relation: str, text: str) -> str | None:
    """The LIKE pattern (escape ``\\``) of a text-matching relation on ``text``; None for
    another relation."""
    form = _PATTERNS.get(relation)
    return None if form is None else form.format(escape_like(text))


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
