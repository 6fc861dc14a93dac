"""Fields, (deep) paths and the FROM clauses they join.

A :class:`Scope` is one FROM clause under construction: its base table plus the LEFT JOINs its
paths need, each made once per path. A :class:`PathResolver` checks every field and type a read
names (cached, primed, not waiting for a fetch) and records it in ``touched``, which the reader
compares with the pending-write markers (cache/replica/pending.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..errors import Passthrough
from ..replica import fieldtypes, pending
from ..replica.schema import FieldSchema, Schema
from ..replica.store import Store
from .state import ReplicaState


class Scope:
    """A FROM clause under construction: a base table plus LEFT JOINs shared by path."""

    def __init__(self, store: Store, entity_type: str, base: Any, from_: Any = None):
        self.store = store
        self.entity_type = entity_type
        self.base = base  # the alias whose rows this scope reads
        self.from_: Any = base if from_ is None else from_
        self._joins: dict[tuple[Any, ...], Any] = {}

    def link(self, alias: Any, fname: str) -> Any:
        """The registry alias giving the live value of ``alias.fname`` (an entity field)."""
        key = ("link", id(alias), fname)
        if key not in self._joins:
            reg = self.store.entities.alias()
            self.from_ = self.from_.outerjoin(
                reg,
                (reg.c.type == alias.c[f"{fname}__type"])
                & (reg.c.id == alias.c[f"{fname}__id"])
                & sa.not_(reg.c.retired),
            )
            self._joins[key] = reg
        return self._joins[key]

    def hop(self, alias: Any, fname: str, target_type: str, active: bool = True) -> Any:
        """LEFT JOIN the row that ``alias.fname`` links to, when it is of ``target_type``
        (and, with ``active``, not retired)."""
        key = ("hop", id(alias), fname, target_type, active)
        if key not in self._joins:
            target = self.store.tables[target_type].alias()
            on = (target.c.id == alias.c[f"{fname}__id"]) & (alias.c[f"{fname}__type"] == target_type)
            if active:
                on = on & sa.not_(target.c._retired)
            self.from_ = self.from_.outerjoin(target, on)
            self._joins[key] = target
        return self._joins[key]


@dataclass(frozen=True)
class ResolvedPath:
    """Where a return field's or a sort's value is: ``alias.c[field.name]``."""

    alias: Any  # None after a multi_entity hop: SG reads the value as None
    field: FieldSchema
    deep: bool  # the path goes through at least one link


def split_path(path: Any) -> list[str]:
    """``f.Type.f...`` as its parts: fields at even positions, the types between them."""
    if not isinstance(path, str) or not path:
        raise Passthrough("bad-field", repr(path)[:60])
    parts = path.split(".")
    if len(parts) % 2 == 0:
        raise Passthrough("bad-field", path[:80])
    return parts


class PathResolver:
    """Checks the fields and types one read names, and records them as ``touched``."""

    def __init__(self, schema: Schema, replica_state: ReplicaState, entity_type: str):
        self.schema = schema
        self.replica_state = replica_state
        self.touched: set[tuple[str, str]] = {(entity_type, pending.WHOLE_TYPE)}

    def field(self, entity_type: str, fname: Any) -> FieldSchema:
        """A field that is cached and primed, or Passthrough."""
        if not isinstance(fname, str):
            raise Passthrough("bad-field", repr(fname)[:60])
        self.touched.add((entity_type, fname))
        fschema = self.schema.field(entity_type, fname)
        if fschema is None:
            raise Passthrough("uncached-field", f"{entity_type}.{fname}"[:80])
        reason = fieldtypes.uncached_reason(fschema.data_type)
        if reason:
            raise Passthrough(reason, f"{entity_type}.{fname}")
        if fname not in self.replica_state.primed.get(entity_type, set()):
            raise Passthrough("not-primed", f"{entity_type}.{fname}")
        return fschema

    def target(self, target: str) -> None:
        """A type named in a deep path must be cached, primed and fetched."""
        self.touched.add((target, pending.WHOLE_TYPE))
        if target not in self.schema:
            raise Passthrough("uncached-type", target[:60])
        if target not in self.replica_state.primed:
            raise Passthrough("not-primed", target)
        if target in self.replica_state.pending_fetch:
            raise Passthrough("pending-fetch", target)

    def walk(self, scope: Scope, path: Any) -> ResolvedPath:
        """Resolve ``f.Type.f...`` from ``scope``'s rows, for a return field or a sort.

        Single-entity hops are LEFT JOINs in ``scope`` (a link of another type gives NULL). A hop
        through a multi_entity field reads as None on SG (deep values are documented for
        single-entity chains only): the alias is then None, and the rest of the path is only checked.
        """
        parts = split_path(path)
        alias: Any = scope.base
        entity_type = scope.entity_type
        for i in range(0, len(parts) - 1, 2):
            fschema = self.field(entity_type, parts[i])
            target = parts[i + 1]
            self.target(target)
            storage = fieldtypes.TYPES[fschema.data_type].storage
            if storage not in ("entity", "multi"):
                raise Passthrough("bad-field", path[:80])
            if storage == "multi" or alias is None:
                alias = None
            else:
                alias = scope.hop(alias, fschema.name, target)
            entity_type = target
        return ResolvedPath(alias, self.field(entity_type, parts[-1]), deep=len(parts) > 1)
