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

Anything else passes with reason ``events-ahead``. So does a read whose id range (or the
poller's page) holds an id given up as a gap that SG may still show (``sgcache_given_up``:
the ingester's sweep looks for it by id and applies it; until then the replica lacks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import Passthrough
from ..wire import EVENT_TYPE

__all__ = ["EVENT_TYPE", "check_answer", "check_given_up", "check_read", "first_given_up", "id_lower_bound",
           "id_upper_bound"]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _id_bounds(group: Any, upper: bool, depth: int = 0) -> list[int]:
    """The bounds each ``id`` condition of an ``and`` group sets: upper (largest id allowed) or lower."""
    if depth > 8 or not isinstance(group, Mapping) or group.get("logical_operator", "and") != "and":
        return []
    conditions = group.get("conditions")
    if not isinstance(conditions, list):
        return []
    bounds: list[int] = []
    for cond in conditions:
        if not isinstance(cond, Mapping):
            continue
        if "conditions" in cond:
            inner = _id_bounds(cond, upper, depth + 1)
            if inner:
                bounds.append(min(inner) if upper else max(inner))
            continue
        if cond.get("path") != "id" or not isinstance(cond.get("values"), list):
            continue
        relation, values = cond.get("relation"), cond["values"]
        ints: list[int] = [v for v in map(_int, values) if v is not None]
        if not values or len(ints) != len(values):
            continue
        if relation in ("is", "in"):
            bounds.append(max(ints) if upper else min(ints))
        elif relation == ("less_than" if upper else "greater_than") and len(ints) == 1:
            bounds.append(ints[0] - 1 if upper else ints[0] + 1)
        elif relation == "between" and len(ints) == 2:
            bounds.append(ints[1] if upper else ints[0])
    return bounds


def id_upper_bound(group: Any) -> int | None:
    """The largest ``id`` an ``and`` group of API3 filters allows, or None when unbounded."""
    bounds = _id_bounds(group, upper=True)
    return min(bounds) if bounds else None


def id_lower_bound(group: Any) -> int | None:
    """The smallest ``id`` an ``and`` group of API3 filters allows, or None when unbounded."""
    bounds = _id_bounds(group, upper=False)
    return max(bounds) if bounds else None


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
    bound = id_upper_bound(_filters(params))
    if bound is not None and bound <= cursor:
        return False
    if _poller(params):
        return True
    raise Passthrough("events-ahead", "not bounded by the event cursor")


def _filters(params: Mapping[str, Any]) -> Any:
    return params.get("filters", {"logical_operator": "and", "conditions": []})


def first_given_up(conn: Connection, given_up: sa.Table, params: Mapping[str, Any], cursor: int) -> int | None:
    """Before a read of events (one that :func:`check_read` let through): the lowest id given up as
    a gap, and still looked for, that the read's id range holds up to the cursor; None when none.
    Asked before the read's own query, so an id applied meanwhile is in its answer."""
    bound, lower = id_upper_bound(_filters(params)), id_lower_bound(_filters(params))
    upper = cursor if bound is None else min(bound, cursor)
    query = sa.select(sa.func.min(given_up.c.id)).where(given_up.c.id <= upper)
    if lower is not None:
        query = query.where(given_up.c.id >= lower)
    return conn.execute(query).scalar()


def check_given_up(result: Mapping[str, Any] | None, first: int | None) -> None:
    """Raise Passthrough when the read could lack the given-up id ``first`` (:func:`first_given_up`):
    a bounded read (``result`` None) whose range holds it, a poller's page that reaches it."""
    if first is None:
        return
    if result is not None:
        entities = result.get("entities") or []
        last = _int(entities[-1].get("id")) if entities and isinstance(entities[-1], Mapping) else None
        if last is not None and last < first:
            return
    raise Passthrough("events-ahead", f"event id {first} was given up as a gap and may show later")


def check_answer(params: Mapping[str, Any], result: Mapping[str, Any], cursor: int) -> None:
    """After a poller-pattern read: raise Passthrough unless the page is SG's for certain."""
    entities = result.get("entities") or []
    paging = params.get("paging") if isinstance(params.get("paging"), Mapping) else {}
    per_page = paging.get("entities_per_page", 500)
    last = _int(entities[-1].get("id")) if entities and isinstance(entities[-1], Mapping) else None
    if (len(entities) != per_page or last is None or last > cursor
            or not (result.get("paging_info") or {}).get("has_next_page")):
        raise Passthrough("events-ahead", "the page may reach past the event cursor")
