"""How big a read may be: page size and depth, filter size, plan cache; the cheap size check.

A read past a limit passes (``paging``, ``filter-size``, ``filter-depth``, ``too-large``): SG
answers it itself, and the proxy spends nothing on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import Passthrough

#: Largest page SG serves (``api_max_entities_per_page``); bigger requests pass.
MAX_PAGE_SIZE = 500
#: Deeper pages than this are passed rather than run as huge OFFSETs.
MAX_OFFSET = 5_000_000
MAX_FILTER_DEPTH = 32
#: Plans kept for reuse (keyed by the request's JSON; ``sgcache_plan_cache``). A plan holds its
#: SQLAlchemy statement, aliases of wide tables included: about 100 kB each (500: ~60 MB).
PLAN_CACHE_SIZE = 500
#: Requests whose JSON is longer than this are planned each time (a plan holds its values).
MAX_PLAN_KEY = 8192
MAX_CONDITIONS = 1000
#: ``in``/``not_in`` lists longer than this are bound as ONE parameter (a JSON array read with
#: ``json_each`` on SQLite, an array compared with ``= ANY`` on PostgreSQL) instead of one
#: parameter per value: the statement stays small whatever the list's length.
MAX_INLINE_VALUES = 32
#: Filter values in one read; a read with more passes (``too-large``) before any work on them.
#: Answering a 30,000-link list costs the proxy ~0.2 s of Python (decoding, planning) that every
#: other client feels; SG answers such a read itself.
MAX_FILTER_VALUES = 10_000
#: Distinct entity types in one long entity ``in`` list; more passes (``too-large``).
MAX_LINK_TYPES = 32


def check_size(params: Any) -> None:
    """Pass a read with more than MAX_FILTER_VALUES filter values (``too-large``), cheaply:
    before the request is serialised, planned or checked value by value."""
    if not isinstance(params, Mapping):
        return
    stack, values, seen = [params.get("filters")], 0, 0
    while stack:
        node = stack.pop()
        if not isinstance(node, Mapping):
            continue
        conditions = node.get("conditions")
        if isinstance(conditions, list):
            seen += len(conditions)
            if seen > MAX_CONDITIONS:
                return  # the planner refuses it (filter-size)
            stack.extend(conditions)
        elif isinstance(node.get("values"), list):
            values += len(node["values"])
    if values > MAX_FILTER_VALUES:
        raise Passthrough("too-large", f"{values} filter values (at most {MAX_FILTER_VALUES})")
