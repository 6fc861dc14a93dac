"""The read engine: an API3 ``read`` request -> one SQL statement -> SG's answer.

Everything the engine is not certain to answer exactly raises :class:`~cache.errors.Passthrough`
with a reason; the caller then sends the request upstream. What is answered, and every pass
reason, is in docs/semantics.md.

A read's way through the package, in the order a reader meets it:

- ``reader.py``: :class:`Reader`, the entry point. Checks the request's size (``limits.py``),
  reuses or builds its plan (plans are cached by the request's JSON while the
  :class:`ReplicaState` (``state.py``) is unchanged), checks the pending-write markers
  (cache/replica/pending.py), runs the plan (``execute.py``) within the read's time budget (``budget.py``).
- ``planner.py``: checks the request against the schema and the replica's state, and builds
  one statement: page first (filter, sort, page the rows), then decorate (join the page's rows
  to what the return fields need).
- ``paths.py``: scopes (a FROM clause and its LEFT JOINs) and (deep) paths; every field and type
  a read names is checked there and recorded as touched.
- ``conditions.py``: the filter tree; ``scalar_conditions.py`` and ``entity_conditions.py``: one
  condition on a column or on a link; ``inlists.py``: long ``in`` lists as one parameter.
- ``sorting.py``: sort keys and paging; ``collation.py``: how text compares and sorts.
- ``plan.py``: the compiled plan, and one small decoder per return field kind.
"""

from .budget import READ_BUDGET_SECONDS, ReadBudget
from .limits import (
    MAX_CONDITIONS,
    MAX_FILTER_DEPTH,
    MAX_FILTER_VALUES,
    MAX_INLINE_VALUES,
    MAX_LINK_TYPES,
    MAX_OFFSET,
    MAX_PAGE_SIZE,
)
from .plan import Plan
from .reader import Reader
from .state import ReplicaState

__all__ = [
    "MAX_CONDITIONS",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_VALUES",
    "MAX_INLINE_VALUES",
    "MAX_LINK_TYPES",
    "MAX_OFFSET",
    "MAX_PAGE_SIZE",
    "READ_BUDGET_SECONDS",
    "Plan",
    "ReadBudget",
    "Reader",
    "ReplicaState",
]
