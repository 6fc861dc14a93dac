"""Planning one read: the request checked against the schema and the replica's state, and built
into one SQL statement (a :class:`~cache.read.plan.Plan`), or Passthrough with the reason.

Page first, then decorate: the statement's inner query filters, sorts and pages the read's rows
(the *rows* scope, alias ``t0``) on the columns those need; its outer query joins only the page's
rows (the *output* scope, alias ``t1``) to what the return fields need (links, names, deep fields).
Each scope is a value passed to what builds on it; neither is replaced half-way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from ..errors import Passthrough
from ..replica import fieldtypes
from ..replica.store import Store
from .conditions import FilterCompiler
from .paths import PathResolver, Scope
from .plan import LinkField, MultiField, NoneField, Plan, RowField, ScalarField
from .relative import RELATIVE, RelativeDates
from .sorting import ordered, page_of, sort_keys
from .state import ReplicaState

#: The params shotgun_api3 always sends; a read without one of them is not the client's
#: (SG's answer to it is not documented): it passes (``bad-params``).
_REQUIRED_PARAMS = ("type", "return_fields", "filters", "return_only", "paging")
_KNOWN_PARAMS = {
    "type",
    "return_fields",
    "filters",
    "return_only",
    "paging",
    "sorts",
    "include_archived_projects",
    "api_return_image_urls",
    "return_paging_info",
    "return_paging_info_without_counts",
}
#: Types without a ``project`` field on SG (include_archived_projects has nothing to leave out).
_PROJECTLESS = {
    "Project", "HumanUser", "ApiUser", "Group", "Department", "Step", "PublishedFileType",
    "TaskTemplate", "LocalStorage", "PermissionRuleSet", "Status", "Icon",
}


def plan_read(store: Store, params: Mapping[str, Any], replica_state: ReplicaState,
              relative: RelativeDates | None = None) -> Plan:
    """Check a read's params, type and the type's state, and build its plan; or Passthrough."""
    if not isinstance(params, Mapping):
        raise Passthrough("bad-params", "read params are not an object")
    unknown = set(params) - _KNOWN_PARAMS
    if unknown:
        raise Passthrough("option", ",".join(sorted(map(str, unknown)))[:60])
    missing = [name for name in _REQUIRED_PARAMS if name not in params]
    if missing:
        raise Passthrough("bad-params", "missing " + ",".join(missing))
    entity_type = params.get("type")
    if not isinstance(entity_type, str) or entity_type not in store.schema:
        raise Passthrough("uncached-type", str(entity_type)[:60])
    if entity_type not in replica_state.primed:
        raise Passthrough("not-primed", entity_type)
    if entity_type in replica_state.pending_fetch:
        raise Passthrough("pending-fetch", entity_type)
    return Planner(store, entity_type, replica_state, relative).build(params)


class Planner:
    """Builds the SQL for one read of ``entity_type``."""

    def __init__(self, store: Store, entity_type: str, replica_state: ReplicaState,
                 relative: RelativeDates | None = None):
        self.store = store
        self.schema = store.schema
        self.entity_type = entity_type
        self.paths = PathResolver(self.schema, replica_state, entity_type)
        self.filters = FilterCompiler(store, self.paths, relative)
        self._archived_guard = False  # see Plan.archived_guard

    def build(self, params: Mapping[str, Any]) -> Plan:
        """Page first, then decorate: one statement whose inner query filters, sorts and
        pages on the columns those need, and whose outer query joins only the page's rows
        to what the return fields need (links, names, deep fields)."""
        rows = Scope(self.store, self.entity_type, self.store.tables[self.entity_type].alias("t0"))
        where = [self._return_only(rows, params.get("return_only", "active"))]
        filters = params.get("filters", {"logical_operator": "and", "conditions": []})
        where.append(self.filters.where(rows, filters))
        archived = params.get("include_archived_projects", True)
        if archived is False:
            where.append(self._not_archived(rows))
        elif archived is not True:
            raise Passthrough("bad-params", "include_archived_projects")
        order = sort_keys(rows, self.paths, params.get("sorts"))
        page_wanted = page_of(params)
        condition = sa.and_(*where)
        page = (
            sa.select(rows.base.c.id.label("pid"), *[expr.label(f"o{i}") for i, (expr, _) in enumerate(order)])
            .select_from(rows.from_)
            .where(condition)
            .order_by(*[ordered(expr, direction) for expr, direction in order])
            .limit(page_wanted.limit + 1)
            .offset(page_wanted.offset)
            .subquery("page")
        )
        count_select = sa.select(sa.func.count()).select_from(rows.from_).where(condition)

        # the output side: the page's rows, joined to what the return fields need
        out = self.store.tables[self.entity_type].alias("t1")
        output = Scope(self.store, self.entity_type, out, from_=page.join(out, out.c.id == page.c.pid))
        columns, fields, multi_fields = self._return_fields(output, params.get("return_fields", ["id"]))
        select = (
            sa.select(*columns)
            .select_from(output.from_)
            .order_by(*[ordered(page.c[f"o{i}"], direction) for i, (_, direction) in enumerate(order)])
        )
        return Plan(self.entity_type, select, count_select, fields, multi_fields, page_wanted.limit,
                    page_wanted.want_count, frozenset(self.paths.touched), frozenset(self.filters.relations),
                    timed=bool(self.filters.relations & RELATIVE), serial=self.filters.multi,
                    archived_guard=self._archived_guard)

    def _return_fields(self, output: Scope, return_fields: Any) -> tuple[list[Any], list[RowField], list[MultiField]]:
        """The output's columns, and how each return field decodes (``id`` and ``type`` always come)."""
        columns: list[Any] = [output.base.c.id.label("c_id")]
        fields: list[RowField] = []
        multi_fields: list[MultiField] = []
        if not isinstance(return_fields, list):
            raise Passthrough("bad-params", "return_fields")
        seen: set[str] = set()
        for n, key in enumerate(return_fields):
            if not isinstance(key, str):
                raise Passthrough("bad-field", repr(key)[:60])
            if key in seen or key in ("id", "type"):
                seen.add(key)
                continue
            seen.add(key)
            resolved = self.paths.walk(output, key)
            alias, fschema = resolved.alias, resolved.field
            storage = fieldtypes.TYPES[fschema.data_type].storage
            label = f"c{n}"
            if alias is None:
                fields.append(NoneField(key))
            elif storage == "multi":
                parent_label = None
                if resolved.deep:
                    parent_label = f"{label}_pid"
                    columns.append(alias.c.id.label(parent_label))
                multi_fields.append(MultiField(key, fschema.entity_type, fschema.name, parent_label))
            elif storage == "entity":
                link = LinkField(key, label)
                columns += link.columns(output.link(alias, fschema.name))
                fields.append(link)
            else:
                scalar = ScalarField(key, label, fschema.data_type, resolved.deep)
                columns += scalar.columns(alias, fschema.name)
                fields.append(scalar)
        return columns, fields, multi_fields

    def _return_only(self, rows: Scope, value: Any) -> Any:
        if value in (None, "active"):
            return sa.not_(rows.base.c._retired)
        if value == "retired":
            return rows.base.c._retired
        raise Passthrough("bad-params", "return_only")

    def _not_archived(self, rows: Scope) -> Any:
        """``include_archived_projects: false``: leave out archived projects (retired or not)
        and the rows of their ``project``; the Project rows themselves when reading Projects. A
        read of another type passes while a retired Project is archived (Plan.archived_guard)."""
        if self.entity_type == "Project":
            self.paths.field("Project", "archived")
            return sa.not_(sa.func.coalesce(rows.base.c.archived, False))
        if self.schema.field(self.entity_type, "project") is None:
            if self.entity_type in _PROJECTLESS:
                return sa.true()
            raise Passthrough("uncached-field", f"{self.entity_type}.project")
        self.paths.field(self.entity_type, "project")
        self.paths.target("Project")
        self.paths.field("Project", "archived")
        self._archived_guard = True
        project = rows.hop(rows.base, "project", "Project", active=False)
        return sa.or_(project.c.id.is_(None), sa.not_(sa.func.coalesce(project.c.archived, False)))
