"""EventLogEntry as a cached type: which reads of it the replica may answer (the proxy's side).

The ingester writes every event it applies as an EventLogEntry row, in the poll's transaction,
and moves ``event_cursor`` with it: every event id at or below the cursor is in the replica
(or was given up as a gap, see cache/ingest/gaps.py; this module is the read side of that contract), ids above it may be missing. So a read of
events is answered only when its answer cannot contain an event above the cursor:

- bounded: the top-level ``and`` of the filters (or an ``and`` group inside it) limits ``id``
  to at most the cursor (``is``, ``in``, ``less_than``, ``between``); or
- the poller pattern (``id greater_than N``, sorted by ``id`` ascending, a page size): checked
  on the answer -- the page is full, its last id is at or below the cursor, the replica has a
  next row (so ``has_next_page`` is SG's too), and no entity count was asked for.

Anything else passes with reason ``events-ahead``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import Passthrough
from ..wire import EVENT_TYPE

__all__ = ["EVENT_TYPE", "check_answer", "check_read", "id_upper_bound"]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def id_upper_bound(group: Any, depth: int = 0) -> int | None:
    """The largest ``id`` an ``and`` group of API3 filters allows, or None when unbounded."""
    if depth > 8 or not isinstance(group, Mapping) or group.get("logical_operator", "and") != "and":
        return None
    conditions = group.get("conditions")
    if not isinstance(conditions, list):
        return None
    bounds: list[int] = []
    for cond in conditions:
        if not isinstance(cond, Mapping):
            continue
        if "conditions" in cond:
            inner = id_upper_bound(cond, depth + 1)
            if inner is not None:
                bounds.append(inner)
            continue
        if cond.get("path") != "id" or not isinstance(cond.get("values"), list):
            continue
        relation, values = cond.get("relation"), cond["values"]
        ints = [_int(v) for v in values]
        if not values or any(v is None for v in ints):
            continue
        if relation in ("is", "in"):
            bounds.append(max(ints))  # type: ignore[type-var]
        elif relation == "less_than" and len(ints) == 1:
            bounds.append(ints[0] - 1)  # type: ignore[operator]
        elif relation == "between" and len(ints) == 2:
            bounds.append(ints[1])  # type: ignore[arg-type]
    return min(bounds) if bounds else None


def _poller(params: Mapping[str, Any]) -> bool:
    sorts = params.get("sorts")
    return (isinstance(sorts, list) and bool(sorts) and isinstance(sorts[0], Mapping)
            and sorts[0].get("field_name") == "id" and sorts[0].get("direction", "asc") == "asc"
            and params.get("return_paging_info") is not True)


def check_read(params: Mapping[str, Any], cursor: int | None) -> bool:
    """Before a read of events: raise Passthrough unless it may be answered; True when the answer
    must still be checked with :func:`check_answer` (the poller pattern)."""
    if cursor is None:
        raise Passthrough("events-ahead", "no event cursor")
    bound = id_upper_bound(params.get("filters", {"logical_operator": "and", "conditions": []}))
    if bound is not None and bound <= cursor:
        return False
    if _poller(params):
        return True
    raise Passthrough("events-ahead", "not bounded by the event cursor")


def check_answer(params: Mapping[str, Any], result: Mapping[str, Any], cursor: int) -> None:
    """After a poller-pattern read: raise Passthrough unless the page is SG's for certain."""
    entities = result.get("entities") or []
    paging = params.get("paging") if isinstance(params.get("paging"), Mapping) else {}
    per_page = paging.get("entities_per_page", 500)
    last = _int(entities[-1].get("id")) if entities and isinstance(entities[-1], Mapping) else None
    if (len(entities) != per_page or last is None or last > cursor
            or not (result.get("paging_info") or {}).get("has_next_page")):
        raise Passthrough("events-ahead", "the page may reach past the event cursor")
