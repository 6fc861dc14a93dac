"""Comparing the cache's answer to a read with SG's, after normalising what SG leaves unordered."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def normalised(results: Any, args: Any) -> Any:
    """``results`` (a read's ``results``) with what SG does not order put in one order: the
    entities by id when the read gives no sorts, every multi-entity list by (type, id)."""
    if not isinstance(results, Mapping) or not isinstance(results.get("entities"), list):
        return results
    entities = [_entity(e) for e in results["entities"]]
    sorts = args.get("sorts") if isinstance(args, Mapping) else None
    if not sorts:
        entities.sort(key=lambda e: (str(e.get("type")), e.get("id") or 0) if isinstance(e, Mapping) else ("", 0))
    return {**results, "entities": entities}


def agree(cache_results: Any, sg_results: Any, args: Any) -> bool:
    """Whether the two answers are the same read's answer."""
    return normalised(cache_results, args) == normalised(sg_results, args)


def _entity(entity: Any) -> Any:
    if not isinstance(entity, Mapping):
        return entity
    return {k: _links(v) for k, v in entity.items()}


def _links(value: Any) -> Any:
    """A multi-entity list (entity dicts) in (type, id) order; anything else as it is."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) and "id" in v for v in value):
        return sorted(value, key=lambda v: (str(v.get("type")), str(v.get("id"))))
    return value
