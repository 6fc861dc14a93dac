"""How text compares and sorts, as SG does: lower case over all of Unicode and code-point order
(both per database: :meth:`cache.replica.dialect.Dialect.lower`, :meth:`~cache.replica.dialect.Dialect.codepoint_order`),
and LIKE patterns whose ``%``, ``_`` and ``\\`` are literal (see docs/semantics.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import Passthrough
from ..replica.fieldtypes import LOWER_SORTED

if TYPE_CHECKING:
    from ..replica.store import Store

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
}


def check_case_mapping(store: Store) -> None:
    """Pass (``case-mapping``) a case-insensitive condition or a text sort on a replica whose
    database's lower() does not lower text as SG does (PostgreSQL with LC_CTYPE C or tr_TR, ...):
    its answer could be wrong. Asked of the database once per replica (``Store.lower_problem``);
    a read's plan asks while it is built (plans are reused: nothing more per request)."""
    problem = store.lower_problem()
    if problem is not None:
        raise Passthrough("case-mapping", problem[:60])


def like_pattern(relation: str, text: str) -> str | None:
    """The LIKE pattern (escape ``\\``) of a text-matching relation on ``text``; None for
    another relation."""
    form = _PATTERNS.get(relation)
    return None if form is None else form.format(escape_like(text))


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
