"""A read's ``filters`` tree as one SQL condition.

Groups nest (``and``/``or``) up to :data:`MAX_FILTER_DEPTH`; a condition names a (deep) path. A
single-entity hop is a LEFT JOIN in the read's scope (no linked row of that type: the value is
NULL); a multi_entity hop is an EXISTS over the linked active rows of that type, in a scope of
its own. The last field's condition is built by cache/read/scalar_conditions.py or
cache/read/entity_conditions.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from ..errors import Passthrough
from ..replica import fieldtypes
from ..replica.store import Store
from .entity_conditions import entity_condition, multi_condition
from .limits import MAX_CONDITIONS, MAX_FILTER_DEPTH, MAX_FILTER_VALUES
from .paths import PathResolver, Scope, split_path
from .relative import RelativeDates
from .scalar_conditions import scalar_condition


class FilterCompiler:
    """Compiles the filters of one read, counting its conditions and values against the limits."""

    def __init__(self, store: Store, paths: PathResolver, relative: RelativeDates | None = None):
        self.store = store
        self.paths = paths
        self.relative = relative
        #: the relations the filters use (a plan with a relative date holds the time it was built at)
        self.relations: set[str] = set()
        #: a condition on a multi_entity field (a correlated EXISTS per row: see Plan.serial)
        self.multi = False
        self._n_conditions = 0
        self._n_values = 0

    def where(self, scope: Scope, filters: Any) -> Any:
        """The condition on ``scope``'s rows that ``filters`` (the top group) means."""
        return self._group(scope, filters, 0)

    def _group(self, scope: Scope, group: Any, depth: int) -> Any:
        if depth > MAX_FILTER_DEPTH:
            raise Passthrough("filter-depth")
        if not isinstance(group, Mapping):
            raise Passthrough("bad-filter", "group is not an object")
        op = group.get("logical_operator", "and")
        conditions = group.get("conditions")
        if op not in ("and", "or") or not isinstance(conditions, list):
            raise Passthrough("bad-filter", "group")
        parts = []
        for cond in conditions:
            self._n_conditions += 1
            if self._n_conditions > MAX_CONDITIONS:
                raise Passthrough("filter-size")
            if isinstance(cond, Mapping) and "conditions" in cond:
                parts.append(self._group(scope, cond, depth + 1))
            else:
                parts.append(self._condition(scope, cond))
        if not parts:
            if op == "or":
                # all([]) is true, but whether SG reads an empty "or" as true or false is not documented
                raise Passthrough("empty-or")
            return sa.true()
        return sa.and_(*parts) if op == "and" else sa.or_(*parts)

    def _condition(self, scope: Scope, cond: Any) -> Any:
        if not isinstance(cond, Mapping) or set(cond) - {"path", "relation", "values"}:
            raise Passthrough("bad-filter", "condition")
        path, relation, values = cond.get("path"), cond.get("relation"), cond.get("values")
        if not isinstance(relation, str) or not isinstance(values, list):
            raise Passthrough("bad-filter", "condition")
        self._n_values += len(values)
        if self._n_values > MAX_FILTER_VALUES:
            raise Passthrough("too-large", f"more than {MAX_FILTER_VALUES} filter values")
        if isinstance(path, str) and path.startswith("$"):
            raise Passthrough("filter-path", path[:60])
        return self._path_condition(scope, scope.base, scope.entity_type, split_path(path), relation, values)

    def _path_condition(
        self, scope: Scope, alias: Any, entity_type: str, parts: list[str], relation: str, values: list[Any],
        joined: bool = False,
    ) -> Any:
        """A condition on a (deep) path from ``alias`` (a row of ``entity_type`` in ``scope``). A
        single-entity hop is a LEFT JOIN (no linked row of that type: the value is NULL); a
        multi_entity hop is an EXISTS over the linked active rows of that type (none: no match,
        whatever the operator). ``joined``: the path went through a single-entity hop."""
        fschema = self.paths.field(entity_type, parts[0])
        info = fieldtypes.TYPES[fschema.data_type]
        if len(parts) == 1:
            if relation not in info.operators:
                raise Passthrough("operator", f"{relation} on {fschema.data_type}")
            if joined and fschema.data_type == "checkbox" and relation in ("is", "is_not") and values == [False]:
                # a checkbox behind a link with no row is NULL: whether SG reads it as false or as no
                # value is not documented ("is True" and "is_not True" agree either way)
                raise Passthrough("filter-value", f"checkbox {relation} False through a link")
            self.relations.add(relation)
            if info.storage == "entity":
                return entity_condition(self.store, scope, alias, fschema, relation, values)
            if info.storage == "multi":
                self.multi = True
                return multi_condition(self.store, alias, fschema, relation, values)
            return scalar_condition(self.store, alias.c[fschema.name], fschema, relation, values,
                                    self.relative)
        target = parts[1]
        self.paths.target(target)
        if info.storage == "entity":
            nxt = scope.hop(alias, fschema.name, target)
            return self._path_condition(scope, nxt, target, parts[2:], relation, values, joined=True)
        if info.storage != "multi":
            raise Passthrough("bad-field", ".".join(parts)[:80])
        assoc = self.store.multi[(entity_type, fschema.name)].alias()
        linked = self.store.tables[target].alias()
        sub = Scope(
            self.store, target, linked,
            from_=assoc.join(
                linked,
                (linked.c.id == assoc.c.child_id) & (assoc.c.child_type == target) & sa.not_(linked.c._retired),
            ),
        )
        inner = self._path_condition(sub, linked, target, parts[2:], relation, values)
        return sa.exists(
            sa.select(sa.literal(1)).select_from(sub.from_).where(assoc.c.parent_id == alias.c.id, inner)
        )
