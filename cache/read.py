"""The read engine: an API3 ``read`` request -> one SQL statement -> SG's answer.

Everything the engine is not certain to answer exactly raises :class:`Passthrough`
with a reason; the caller then sends the request upstream.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from . import fieldtypes, pending
from .errors import Passthrough
from .ingest import eventlog
from .schema import FieldSchema
from .store import Store

#: Largest page SG serves (``api_max_entities_per_page``); bigger requests pass.
MAX_PAGE_SIZE = 500
#: Deeper pages than this are passed rather than run as huge OFFSETs.
MAX_OFFSET = 5_000_000
MAX_FILTER_DEPTH = 32
#: Plans kept for reuse (keyed by the request's JSON).
PLAN_CACHE_SIZE = 2000
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
#: What one read may cost, in seconds from its first statement to its last row (all its statements
#: together; the addon's ``sgcache_read_budget``). A read past it is stopped by the database
#: (PostgreSQL: ``statement_timeout``; SQLite: a progress handler) and passes (``slow-read``):
#: that client's problem, not the database's.
READ_BUDGET_SECONDS = 2.0
#: A request that overran its budget passes at once (``slow-read``) when it comes again within
#: this many seconds: a client repeating a slow read costs the database nothing more.
SLOW_MEMORY_SECONDS = 60.0
SLOW_MEMORY_SIZE = 1000
#: SQLite: virtual-machine instructions between two looks at the clock (a hit runs far fewer).
SQLITE_PROGRESS_STEPS = 200_000
#: The params shotgun_api3 always sends; a read without one of them is not the client's
#: (SG's answer to it is not documented): it passes (``bad-params``).
_REQUIRED_PARAMS = ("type", "return_fields", "filters", "return_only", "paging")
#: The storage classes of values an ``in`` list may hold, as array element types (PostgreSQL).
_ARRAY_TYPES = {"text": sa.Text, "int": sa.BigInteger, "float": sa.Float}

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
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_CASE_INSENSITIVE = {"text"}
#: Types whose sort key is the lower-cased text (the rule the fake SG shares; docs/semantics.md).
_SORT_LOWER = {"text", "entity_type", "color", "uuid", "list", "status_list", "footage"}
#: Types without a ``project`` field on SG (include_archived_projects has nothing to leave out).
_PROJECTLESS = {
    "Project", "HumanUser", "ApiUser", "Group", "Department", "Step", "PublishedFileType",
    "TaskTemplate", "LocalStorage", "PermissionRuleSet", "Status", "Icon",
}


@dataclass
class ReadContext:
    """What the engine needs to know of the replica's state, refreshed by the caller."""

    primed: dict[str, set[str]]
    pending_fetch: set[str] = field(default_factory=set)
    event_cursor: int | None = None  # the ingester's cursor: EventLogEntry reads above it pass

    @functools.cached_property
    def fingerprint(self) -> tuple[frozenset[Any], frozenset[str]]:
        """What a plan depends on: equal fingerprints, same planning decisions."""
        return frozenset((t, frozenset(f)) for t, f in self.primed.items()), frozenset(self.pending_fetch)


class ReadBudget:
    """The time one read may spend in the database; see :data:`READ_BUDGET_SECONDS`.

    Use ``with budget.watching(conn):`` around the read and call :meth:`before_statement`
    before each statement. A read that overruns raises ``Passthrough("slow-read")``.
    """

    def __init__(self, seconds: float = READ_BUDGET_SECONDS):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds  # restarted by watching(): planning is not counted
        self.spent = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def before_statement(self, conn: Connection) -> None:
        """Raise slow-read when the budget is spent; on PostgreSQL, give the next statement
        what is left (``SET LOCAL``: it ends with the read's transaction)."""
        left = self.left()
        if left <= 0:
            self.spent = True
            raise Passthrough("slow-read", f"over {self.seconds:g}s")
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(left * 1000))}")

    @contextlib.contextmanager
    def watching(self, conn: Connection) -> Iterator[None]:
        """Stop a SQLite statement that runs past the deadline; turn the database's
        cancellation of a statement over budget into ``Passthrough("slow-read")``."""
        raw = conn.connection.driver_connection if conn.dialect.name == "sqlite" else None
        self.deadline = time.monotonic() + self.seconds

        def _progress() -> int:
            if time.monotonic() > self.deadline:
                self.spent = True
                return 1  # sqlite3 raises OperationalError("interrupted")
            return 0

        if raw is not None:
            raw.set_progress_handler(_progress, SQLITE_PROGRESS_STEPS)
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if self.spent or getattr(exc.orig, "pgcode", None) == PG_QUERY_CANCELED:
                self.spent = True
                conn.rollback()  # PostgreSQL: the cancelled statement aborted the transaction
                raise Passthrough("slow-read", f"over {self.seconds:g}s") from exc
            raise
        finally:
            if raw is not None:
                raw.set_progress_handler(None, 0)


#: PostgreSQL's SQLSTATE for a statement cancelled (here: by ``statement_timeout``).
PG_QUERY_CANCELED = "57014"


@dataclass
class _Link:
    """The effective value of an entity field: a registry row (NULL when retired/absent)."""

    reg: Any  # aliased sgcache_entities


class _Scope:
    """A FROM clause under construction: a base table plus LEFT JOINs shared by path."""

    def __init__(self, engine: ReadEngine, entity_type: str, alias: Any):
        self.engine = engine
        self.entity_type = entity_type
        self.base = alias
        self.from_: Any = alias
        self._joins: dict[tuple[Any, ...], Any] = {}

    def link(self, alias: Any, entity_type: str, fname: str) -> Any:
        """The registry alias giving the live value of ``alias.fname`` (an entity field)."""
        key = ("link", id(alias), fname)
        if key not in self._joins:
            reg = self.engine.store.entities.alias()
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
            target = self.engine.store.tables[target_type].alias()
            on = (target.c.id == alias.c[f"{fname}__id"]) & (alias.c[f"{fname}__type"] == target_type)
            if active:
                on = on & sa.not_(target.c._retired)
            self.from_ = self.from_.outerjoin(target, on)
            self._joins[key] = target
        return self._joins[key]


class ReadEngine:
    """Answers API3 ``read`` requests from a :class:`Store`."""

    def __init__(self, store: Store, plan_cache_size: int = PLAN_CACHE_SIZE):
        self.store = store
        self.schema = store.schema
        # Pipelines repeat the same reads: the same request (same JSON) reuses its plan while the
        # replica's state (primed fields, pending fetches) is unchanged.
        self._plans: collections.OrderedDict[str, tuple[Any, _Plan]] = collections.OrderedDict()
        self._plans_lock = threading.Lock()
        self._plan_cache_size = plan_cache_size
        # requests that overran their budget lately (digest of the request -> until when)
        self._slow: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    # -- entry point -----------------------------------------------------------------
    def read(
        self, conn: Connection, params: Mapping[str, Any], ctx: ReadContext, budget: ReadBudget | None = None,
        check_pending: bool = False,
    ) -> dict[str, Any]:
        """Answer a read; the value of ``results`` in SG's reply.

        With a ``budget``, a read that would cost more passes (``slow-read``), and so does the
        same request again for :data:`SLOW_MEMORY_SECONDS` (without touching the database).
        With ``check_pending``, a read touching a pending-write marker (cache/pending.py) passes.
        """
        _check_size(params)
        key = _request_key(params)
        digest = None
        if budget is not None and key is not None:
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            if self._recently_slow(digest):
                raise Passthrough("slow-read", "overran its budget recently")
        plan = self._plan(params, ctx, key)
        if check_pending:
            pending.check_read(conn, self.store.pending, plan.touched)
        # events above the ingester's cursor may be missing
        check_page = plan.entity_type == eventlog.EVENT_TYPE and eventlog.check_read(params, ctx.event_cursor)
        if budget is None:
            result = self.execute(conn, plan)
        else:
            try:
                with budget.watching(conn):
                    result = self.execute(conn, plan, budget)
            except Passthrough as exc:
                if exc.reason == "slow-read" and digest is not None:
                    self._remember_slow(digest)
                raise
        if check_page:
            eventlog.check_answer(params, result, ctx.event_cursor)  # type: ignore[arg-type]
        return result

    def _remember_slow(self, digest: bytes) -> None:
        with self._plans_lock:
            self._slow[digest] = time.monotonic() + SLOW_MEMORY_SECONDS
            self._slow.move_to_end(digest)
            while len(self._slow) > SLOW_MEMORY_SIZE:
                self._slow.popitem(last=False)

    def _recently_slow(self, digest: bytes) -> bool:
        if not self._slow:
            return False
        with self._plans_lock:
            until = self._slow.get(digest)
            if until is None:
                return False
            if time.monotonic() < until:
                return True
            del self._slow[digest]
            return False

    def plan(self, params: Mapping[str, Any], ctx: ReadContext) -> _Plan:
        """Check a read against the schema and build its SQL, or raise Passthrough."""
        _check_size(params)
        return self._plan(params, ctx, _request_key(params))

    def _plan(self, params: Mapping[str, Any], ctx: ReadContext, key: str | None) -> _Plan:
        if key is not None and len(key) > MAX_PLAN_KEY:
            key = None  # a huge request (thousands of ids): not worth keeping
        fingerprint = ctx.fingerprint if key is not None else None
        if key is not None:
            with self._plans_lock:
                cached = self._plans.get(key)
                if cached is not None and cached[0] == fingerprint:
                    self._plans.move_to_end(key)
                    return cached[1]
        plan = self._build_plan(params, ctx)
        if key is not None:
            with self._plans_lock:
                self._plans[key] = (fingerprint, plan)
                self._plans.move_to_end(key)
                while len(self._plans) > self._plan_cache_size:
                    self._plans.popitem(last=False)
        return plan

    def _build_plan(self, params: Mapping[str, Any], ctx: ReadContext) -> _Plan:
        if not isinstance(params, Mapping):
            raise Passthrough("bad-params", "read params are not an object")
        unknown = set(params) - _KNOWN_PARAMS
        if unknown:
            raise Passthrough("option", ",".join(sorted(map(str, unknown)))[:60])
        missing = [name for name in _REQUIRED_PARAMS if name not in params]
        if missing:
            raise Passthrough("bad-params", "missing " + ",".join(missing))
        entity_type = params.get("type")
        if not isinstance(entity_type, str) or entity_type not in self.schema:
            raise Passthrough("uncached-type", str(entity_type)[:60])
        if entity_type not in ctx.primed:
            raise Passthrough("not-primed", entity_type)
        if entity_type in ctx.pending_fetch:
            raise Passthrough("pending-fetch", entity_type)
        return _Planner(self, entity_type, ctx).build(params)

    def execute(self, conn: Connection, plan: _Plan, budget: ReadBudget | None = None) -> dict[str, Any]:
        """Run a plan (each statement within ``budget`` when given)."""
        if budget is not None:
            budget.before_statement(conn)
        rows = conn.execute(plan.select).all()
        # One row past the page tells whether there is a next page.
        has_next = len(rows) > plan.limit
        rows = rows[: plan.limit]
        entities = [plan.decode(row) for row in rows]
        if plan.multi_fields and entities:
            self._fill_multi(conn, plan, entities, rows, budget)
        paging_info: dict[str, Any] = {"has_next_page": has_next}
        if plan.want_count:
            if budget is not None:
                budget.before_statement(conn)
            paging_info["entity_count"] = int(conn.execute(plan.count_select).scalar_one())
        return {"entities": entities, "paging_info": paging_info}

    def _fill_multi(
        self, conn: Connection, plan: _Plan, entities: list[dict[str, Any]], rows: list[Any],
        budget: ReadBudget | None = None,
    ) -> None:
        """One query per multi_entity return field, for all the rows of the page."""
        for key, owner_type, fname, label in plan.multi_fields:
            if label is None:  # a field of the row itself
                parents = [e["id"] for e in entities]
            else:  # the field of a linked row (deep path); no linked row reads as None
                parents = [row._mapping[label] for row in rows]
            if budget is not None:
                budget.before_statement(conn)
            values = self._multi_values(conn, owner_type, fname, {p for p in parents if p is not None})
            for e, parent in zip(entities, parents, strict=True):
                e[key] = None if parent is None else list(values.get(parent, ()))

    def _multi_values(
        self, conn: Connection, owner_type: str, fname: str, parent_ids: set[int]
    ) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        if not parent_ids:
            return out
        assoc = self.store.multi[(owner_type, fname)]
        reg = self.store.entities
        stmt = (
            sa.select(assoc.c.parent_id, reg.c.type, reg.c.id, reg.c.name, reg.c.name_known)
            .select_from(
                assoc.join(
                    reg,
                    (reg.c.type == assoc.c.child_type)
                    & (reg.c.id == assoc.c.child_id)
                    & sa.not_(reg.c.retired),
                )
            )
            .where(assoc.c.parent_id.in_(sorted(parent_ids)))
            .order_by(assoc.c.parent_id, assoc.c.pos)
        )
        for row in conn.execute(stmt):
            if not row.name_known:
                raise Passthrough("link-name-unknown", f"{row.type} {row.id}")
            out.setdefault(row.parent_id, []).append({"type": row.type, "id": row.id, "name": row.name})
        return out


def _check_size(params: Any) -> None:
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


def _request_key(params: Any) -> str | None:
    """The request as canonical JSON (None when it is not JSON-able)."""
    try:
        return json.dumps(params, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


@dataclass
class _Plan:
    entity_type: str
    select: Any
    count_select: Any
    columns: list[tuple[str, str, Any]]  # (result key, kind, info)
    multi_fields: list[tuple[str, str, str, str | None]]  # (result key, owner type, field, parent label)
    limit: int
    want_count: bool
    #: (type, field) of every field the read names, and (type, "*") of every type it reads
    touched: frozenset[tuple[str, str]] = frozenset()

    def decode(self, row: Any) -> dict[str, Any]:
        m = row._mapping
        out: dict[str, Any] = {"type": self.entity_type, "id": m["c_id"]}
        for key, kind, info in self.columns:
            label = f"c{info[0]}"
            if kind == "none":
                out[key] = None
            elif kind == "scalar":
                if info[2] and m[f"{label}_pid"] is None:
                    out[key] = None  # a deep path whose link is empty or of another type
                else:
                    out[key] = fieldtypes.decode_scalar(info[1], m[label])
            elif kind == "link":
                link_id = m[f"{label}_id"]
                if link_id is None:
                    out[key] = None
                else:
                    if not m[f"{label}_known"]:
                        raise Passthrough("link-name-unknown", f"{m[f'{label}_type']} {link_id}")
                    out[key] = {"type": m[f"{label}_type"], "id": link_id, "name": m[f"{label}_name"]}
        return out


class _Planner:
    """Builds the SQL for one read."""

    def __init__(self, engine: ReadEngine, entity_type: str, ctx: ReadContext):
        self.engine = engine
        self.store = engine.store
        self.schema = engine.schema
        self.ctx = ctx
        self.entity_type = entity_type
        self.base = self.store.tables[entity_type].alias("t0")
        self.scope = _Scope(engine, entity_type, self.base)
        self._n_conditions = 0
        self._n_values = 0
        self.touched: set[tuple[str, str]] = {(entity_type, pending.WHOLE_TYPE)}

    # -- fields and paths --------------------------------------------------------------
    def _field(self, entity_type: str, fname: Any) -> FieldSchema:
        if not isinstance(fname, str):
            raise Passthrough("bad-field", repr(fname)[:60])
        self.touched.add((entity_type, fname))
        fschema = self.schema.field(entity_type, fname)
        if fschema is None:
            raise Passthrough("uncached-field", f"{entity_type}.{fname}"[:80])
        reason = fieldtypes.uncached_reason(fschema.data_type)
        if reason:
            raise Passthrough(reason, f"{entity_type}.{fname}")
        if fname not in self.ctx.primed.get(entity_type, set()):
            raise Passthrough("not-primed", f"{entity_type}.{fname}")
        return fschema

    def _split(self, path: Any) -> list[str]:
        if not isinstance(path, str) or not path:
            raise Passthrough("bad-field", repr(path)[:60])
        parts = path.split(".")
        if len(parts) % 2 == 0:
            raise Passthrough("bad-field", path[:80])
        return parts

    def _target(self, target: str) -> None:
        """A type named in a deep path must be cached, primed and fetched."""
        self.touched.add((target, pending.WHOLE_TYPE))
        if target not in self.schema:
            raise Passthrough("uncached-type", target[:60])
        if target not in self.ctx.primed:
            raise Passthrough("not-primed", target)
        if target in self.ctx.pending_fetch:
            raise Passthrough("pending-fetch", target)

    def _walk(self, path: Any) -> tuple[Any, FieldSchema, list[tuple[Any, FieldSchema, str]]]:
        """Resolve ``f.Type.f...`` for a return field or a sort: (alias, final field, hops).

        Single-entity hops are LEFT JOINs (a link of another type gives NULL). A hop through a
        multi_entity field reads as None on SG (deep values are documented for single-entity
        chains only): the alias is then None, and the rest of the path is only checked.
        """
        parts = self._split(path)
        alias: Any = self.base
        entity_type = self.entity_type
        hops: list[tuple[Any, FieldSchema, str]] = []
        for i in range(0, len(parts) - 1, 2):
            fschema = self._field(entity_type, parts[i])
            target = parts[i + 1]
            self._target(target)
            storage = fieldtypes.TYPES[fschema.data_type].storage
            if storage not in ("entity", "multi"):
                raise Passthrough("bad-field", path[:80])
            hops.append((alias, fschema, target))
            if storage == "multi" or alias is None:
                alias = None
            else:
                alias = self.scope.hop(alias, fschema.name, target)
            entity_type = target
        return alias, self._field(entity_type, parts[-1]), hops

    # -- build ------------------------------------------------------------------------
    def build(self, params: Mapping[str, Any]) -> _Plan:
        """Page first, then decorate: one statement whose inner query filters, sorts and
        pages on the columns those need, and whose outer query joins only the page's rows
        to what the return fields need (links, names, deep fields)."""
        where = [self._return_only(params.get("return_only", "active"))]
        filters = params.get("filters", {"logical_operator": "and", "conditions": []})
        where.append(self._group(filters, 0))
        archived = params.get("include_archived_projects", True)
        if archived is False:
            where.append(self._not_archived())
        elif archived is not True:
            raise Passthrough("bad-params", "include_archived_projects")
        order = self._sorts(params.get("sorts"))
        limit, offset, want_count = self._paging(params)
        condition = sa.and_(*where)
        page = (
            sa.select(self.base.c.id.label("pid"), *[expr.label(f"o{i}") for i, (expr, _) in enumerate(order)])
            .select_from(self.scope.from_)
            .where(condition)
            .order_by(*[_order(expr, direction) for expr, direction in order])
            .limit(limit + 1)
            .offset(offset)
            .subquery("page")
        )
        count_select = sa.select(sa.func.count()).select_from(self.scope.from_).where(condition)

        # the output side: the page's rows, joined to what the return fields need
        self.base = self.store.tables[self.entity_type].alias("t1")
        self.scope = _Scope(self.engine, self.entity_type, self.base)
        self.scope.from_ = page.join(self.base, self.base.c.id == page.c.pid)
        columns, decoded, multi_fields = self._return_fields(params.get("return_fields", ["id"]))
        select = (
            sa.select(*columns)
            .select_from(self.scope.from_)
            .order_by(*[_order(page.c[f"o{i}"], direction) for i, (_, direction) in enumerate(order)])
        )
        return _Plan(self.entity_type, select, count_select, decoded, multi_fields, limit, want_count,
                     frozenset(self.touched))

    def _return_fields(self, return_fields: Any) -> tuple[list[Any], list[tuple[str, str, Any]], list[Any]]:
        columns: list[Any] = [self.base.c.id.label("c_id")]
        decoded: list[tuple[str, str, Any]] = []
        multi_fields: list[tuple[str, str, str, str | None]] = []
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
            alias, fschema, hops = self._walk(key)
            storage = fieldtypes.TYPES[fschema.data_type].storage
            label = f"c{n}"
            if alias is None:
                decoded.append((key, "none", (n,)))
            elif storage == "multi":
                if hops:
                    columns.append(alias.c.id.label(f"{label}_pid"))
                    multi_fields.append((key, fschema.entity_type, fschema.name, f"{label}_pid"))
                else:
                    multi_fields.append((key, fschema.entity_type, fschema.name, None))
            elif storage == "entity":
                reg = self.scope.link(alias, fschema.entity_type, fschema.name)
                columns += [
                    reg.c.type.label(f"{label}_type"),
                    reg.c.id.label(f"{label}_id"),
                    reg.c.name.label(f"{label}_name"),
                    reg.c.name_known.label(f"{label}_known"),
                ]
                decoded.append((key, "link", (n,)))
            else:
                columns.append(alias.c[fschema.name].label(label))
                if hops:
                    columns.append(alias.c.id.label(f"{label}_pid"))
                decoded.append((key, "scalar", (n, fschema.data_type, bool(hops))))
        return columns, decoded, multi_fields

    def _return_only(self, value: Any) -> Any:
        if value in (None, "active"):
            return sa.not_(self.base.c._retired)
        if value == "retired":
            return self.base.c._retired
        raise Passthrough("bad-params", "return_only")

    def _not_archived(self) -> Any:
        """``include_archived_projects: false``: leave out archived projects (retired or not)
        and the rows of their ``project``; the Project rows themselves when reading Projects."""
        if self.entity_type == "Project":
            self._field("Project", "archived")
            return sa.not_(sa.func.coalesce(self.base.c.archived, False))
        if self.schema.field(self.entity_type, "project") is None:
            if self.entity_type in _PROJECTLESS:
                return sa.true()
            raise Passthrough("uncached-field", f"{self.entity_type}.project")
        self._field(self.entity_type, "project")
        self._target("Project")
        self._field("Project", "archived")
        project = self.scope.hop(self.base, "project", "Project", active=False)
        return sa.or_(project.c.id.is_(None), sa.not_(sa.func.coalesce(project.c.archived, False)))

    # -- filters -----------------------------------------------------------------------
    def _group(self, group: Any, depth: int) -> Any:
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
                parts.append(self._group(cond, depth + 1))
            else:
                parts.append(self._condition(cond))
        if not parts:
            if op == "or":
                # all([]) is true, but whether SG reads an empty "or" as true or false is not documented
                raise Passthrough("empty-or")
            return sa.true()
        return sa.and_(*parts) if op == "and" else sa.or_(*parts)

    def _condition(self, cond: Any) -> Any:
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
        return self._path_condition(self.scope, self.base, self.entity_type, self._split(path), relation, values)

    def _path_condition(
        self, scope: _Scope, alias: Any, entity_type: str, parts: list[str], relation: str, values: list[Any]
    ) -> Any:
        """A condition on a (deep) path. A single-entity hop is a LEFT JOIN (no linked row of
        that type: the value is NULL); a multi_entity hop is an EXISTS over the linked active
        rows of that type (none: no match, whatever the operator)."""
        fschema = self._field(entity_type, parts[0])
        info = fieldtypes.TYPES[fschema.data_type]
        if len(parts) == 1:
            if relation not in info.operators:
                raise Passthrough("operator", f"{relation} on {fschema.data_type}")
            if info.storage == "entity":
                return self._entity_condition(scope, alias, fschema, relation, values)
            if info.storage == "multi":
                return self._multi_condition(alias, fschema, relation, values)
            return self._scalar_condition(alias.c[fschema.name], fschema, relation, values)
        target = parts[1]
        self._target(target)
        if info.storage == "entity":
            nxt = scope.hop(alias, fschema.name, target)
            return self._path_condition(scope, nxt, target, parts[2:], relation, values)
        if info.storage != "multi":
            raise Passthrough("bad-field", ".".join(parts)[:80])
        assoc = self.store.multi[(entity_type, fschema.name)].alias()
        linked = self.store.tables[target].alias()
        sub = _Scope(self.engine, target, linked)
        sub.from_ = assoc.join(
            linked,
            (linked.c.id == assoc.c.child_id) & (assoc.c.child_type == target) & sa.not_(linked.c._retired),
        )
        inner = self._path_condition(sub, linked, target, parts[2:], relation, values)
        return sa.exists(
            sa.select(sa.literal(1)).select_from(sub.from_).where(assoc.c.parent_id == alias.c.id, inner)
        )

    def _value(self, fschema: FieldSchema, value: Any) -> Any:
        """A filter value as stored, or Passthrough when its shape is not the field's."""
        if value is None:
            return None
        dt = fschema.data_type
        if dt == "date" and not (isinstance(value, str) and _DATE_RE.match(value)):
            raise Passthrough("filter-value", f"date {value!r}"[:60])
        if dt == "date_time" and not (isinstance(value, str) and _DATETIME_RE.match(value)):
            raise Passthrough("filter-value", f"date_time {value!r}"[:60])
        try:
            return fieldtypes.encode_scalar(dt, value)
        except ValueError as exc:
            raise Passthrough("filter-value", str(exc)[:60]) from None

    def _scalar_condition(self, col: Any, fschema: FieldSchema, relation: str, values: list[Any]) -> Any:
        ci = fschema.data_type in _CASE_INSENSITIVE

        def norm(expr: Any) -> Any:
            return self._lower(expr) if ci else expr

        def lit(v: Any) -> Any:
            v = self._value(fschema, v)
            return v.lower() if ci and isinstance(v, str) else v

        if relation in ("is", "is_not"):
            if len(values) != 1:
                raise Passthrough("filter-value", f"{relation} takes one value")
            value = lit(values[0])
            if fschema.data_type == "checkbox":
                if value is None:
                    raise Passthrough("filter-value", "checkbox None")
                match = col == value
            elif value is None:
                match = col.is_(None)
                return match if relation == "is" else sa.not_(match)
            else:
                match = norm(col) == value
            if relation == "is":
                return match
            return sa.or_(col.is_(None), sa.not_(match))
        if relation in ("in", "not_in"):
            lits = [lit(v) for v in values]
            non_null = [v for v in lits if v is not None]
            storage = fieldtypes.TYPES[fschema.data_type].storage
            match = self._in_list(norm(col), non_null, storage) if non_null else sa.false()
            if None in lits:
                match = sa.or_(match, col.is_(None))
            if relation == "in":
                return match
            if None in lits:
                return sa.not_(match)
            return sa.or_(col.is_(None), sa.not_(match))
        if relation in ("contains", "not_contains", "starts_with", "ends_with"):
            if len(values) != 1 or not isinstance(values[0], str):
                raise Passthrough("filter-value", relation)
            text = _escape_like(values[0].lower())
            pattern = {
                "contains": f"%{text}%",
                "not_contains": f"%{text}%",
                "starts_with": f"{text}%",
                "ends_with": f"%{text}",
            }[relation]
            match = self._lower(col).like(pattern, escape="\\")
            if relation == "not_contains":
                return sa.or_(col.is_(None), sa.not_(match))
            return sa.and_(col.is_not(None), match)
        if relation in ("less_than", "greater_than"):
            if len(values) != 1 or values[0] is None:
                raise Passthrough("filter-value", relation)
            value = lit(values[0])
            return col < value if relation == "less_than" else col > value
        if relation in ("between", "not_between"):
            if len(values) != 2 or (values[0] is None and values[1] is None):
                raise Passthrough("filter-value", relation)
            lo, hi = lit(values[0]), lit(values[1])
            parts = []
            if lo is not None:
                parts.append(col >= lo)
            if hi is not None:
                parts.append(col <= hi)
            inside = sa.and_(*parts)
            if relation == "between":
                return sa.and_(col.is_not(None), inside)
            # NULL is neither inside nor outside the range (as SQL's NOT BETWEEN; the fake SG agrees)
            return sa.and_(col.is_not(None), sa.not_(inside))
        raise Passthrough("operator", relation)

    def _in_list(self, expr: Any, values: list[Any], storage: str) -> Any:
        """``expr IN values`` (no None among them): inline for short lists, else one bound
        parameter, so a list of 30,000 values is neither 30,000 parameters nor a deep tree."""
        if len(values) <= MAX_INLINE_VALUES:
            return expr.in_(values)
        if storage not in _ARRAY_TYPES:
            raise Passthrough("filter-value", f"long in list of {storage}")
        if self.store.dialect == "postgresql":
            array = sa.bindparam(None, values, type_=postgresql.ARRAY(_ARRAY_TYPES[storage]()))
            return expr == sa.any_(array)
        if any(isinstance(v, str) and "\x00" in v for v in values):
            raise Passthrough("filter-value", "NUL in a long in list")
        try:
            text = json.dumps(values, allow_nan=False, ensure_ascii=False)
        except ValueError:
            raise Passthrough("filter-value", "not a finite number") from None
        each = sa.func.json_each(sa.bindparam(None, text, type_=sa.Text)).table_valued("value")
        return expr.in_(sa.select(each.c.value))

    def _link_in(self, reg: Any, pairs: list[tuple[str, int]]) -> Any:
        """The registry row ``reg`` is one of ``pairs`` (type, id). A long list is grouped by
        type: one ``type = t AND id IN (...)`` per type, each id list bound as one parameter."""
        if len(pairs) <= MAX_INLINE_VALUES:
            return sa.or_(*[(reg.c.type == t) & (reg.c.id == i) for t, i in pairs])
        by_type: dict[str, list[int]] = {}
        for t, i in pairs:
            by_type.setdefault(t, []).append(i)
        if len(by_type) > MAX_LINK_TYPES:
            raise Passthrough("too-large", f"links of more than {MAX_LINK_TYPES} types")
        return sa.or_(*[(reg.c.type == t) & self._in_list(reg.c.id, ids, "int") for t, ids in by_type.items()])

    def _link_value(self, value: Any) -> tuple[str, int] | None:
        if type(value) is dict:  # the common shape, checked cheaply (30,000-link lists)
            t, i = value.get("type"), value.get("id")
            if type(t) is str and type(i) is int:
                return t, i
        if value is None:
            return None
        if (
            not isinstance(value, Mapping)
            or not isinstance(value.get("type"), str)
            or not isinstance(value.get("id"), int)
            or isinstance(value.get("id"), bool)
        ):
            raise Passthrough("filter-value", "entity value")
        return value["type"], value["id"]

    def _name_ok(self, fschema: FieldSchema) -> None:
        """name_* filters need every linkable type's names to be known."""
        for link_type in fschema.links or ("*",):
            entity = self.schema.entities.get(link_type)
            if entity is None or entity.name_field not in entity.fields:
                raise Passthrough("name-filter", f"{fschema.entity_type}.{fschema.name}")

    def _name_test(self, relation: str, values: list[Any], name: Any) -> Any:
        """name_* on one linked name (a link whose entity has no name counts as "")."""
        if len(values) != 1 or not isinstance(values[0], str):
            raise Passthrough("filter-value", relation)
        text = values[0].lower()
        name = sa.func.coalesce(self._lower(name), "")
        if relation == "name_is":
            return name == text
        esc = _escape_like(text)
        pattern = {
            "name_contains": f"%{esc}%",
            "name_not_contains": f"%{esc}%",
            "name_starts_with": f"{esc}%",
            "name_ends_with": f"%{esc}",
        }.get(relation)
        if pattern is None:
            raise Passthrough("operator", relation)
        return name.like(pattern, escape="\\")

    def _entity_condition(
        self, scope: _Scope, alias: Any, fschema: FieldSchema, relation: str, values: list[Any]
    ) -> Any:
        reg = scope.link(alias, fschema.entity_type, fschema.name)
        linked = reg.c.id.is_not(None)
        if relation in ("is", "is_not", "in", "not_in"):
            if relation in ("is", "is_not") and len(values) != 1:
                raise Passthrough("filter-value", relation)
            links = [self._link_value(v) for v in values]
            pairs = [p for p in links if p is not None]
            match = self._link_in(reg, pairs) if pairs else sa.false()
            if None in links:
                match = sa.or_(match, reg.c.id.is_(None))
            if relation in ("is", "in"):
                return match
            return sa.or_(reg.c.id.is_(None), sa.not_(match)) if None not in links else sa.not_(match)
        if relation in ("type_is", "type_is_not"):
            if len(values) != 1:
                raise Passthrough("filter-value", relation)
            value = values[0]
            if value is None:
                match = reg.c.id.is_(None)
                return match if relation == "type_is" else sa.not_(match)
            if not isinstance(value, str):
                raise Passthrough("filter-value", relation)
            if relation == "type_is":
                return reg.c.type == value
            return sa.or_(reg.c.id.is_(None), reg.c.type != value)
        self._name_ok(fschema)
        test = self._name_test(relation, values, reg.c.name)
        if relation == "name_not_contains":
            return sa.not_(sa.and_(linked, test))
        return sa.and_(linked, test)

    def _multi_condition(self, alias: Any, fschema: FieldSchema, relation: str, values: list[Any]) -> Any:
        """multi_entity: is/in mean "one of the linked entities is"; the negations are NOT of that."""
        assoc = self.store.multi[(fschema.entity_type, fschema.name)].alias()
        reg = self.store.entities.alias()
        base = (
            sa.select(sa.literal(1))
            .select_from(
                assoc.join(
                    reg,
                    (reg.c.type == assoc.c.child_type) & (reg.c.id == assoc.c.child_id) & sa.not_(reg.c.retired),
                )
            )
            .where(assoc.c.parent_id == alias.c.id)
        )
        empty = ~sa.exists(base)
        if relation in ("is", "is_not", "in", "not_in"):
            if relation in ("is", "is_not") and len(values) != 1:
                raise Passthrough("filter-value", relation)
            links = [self._link_value(v) for v in values]
            pairs = [p for p in links if p is not None]
            parts = []
            if pairs:
                parts.append(sa.exists(base.where(self._link_in(reg, pairs))))
            if None in links:
                parts.append(empty)
            hit = sa.or_(*parts) if parts else sa.false()
            return hit if relation in ("is", "in") else sa.not_(hit)
        if relation in ("type_is", "type_is_not"):
            if len(values) != 1 or not (values[0] is None or isinstance(values[0], str)):
                raise Passthrough("filter-value", relation)
            hit = empty if values[0] is None else sa.exists(base.where(reg.c.type == values[0]))
            return hit if relation == "type_is" else sa.not_(hit)
        self._name_ok(fschema)
        hit = sa.exists(base.where(self._name_test(relation, values, reg.c.name)))
        return sa.not_(hit) if relation == "name_not_contains" else hit

    # -- sorts and paging ----------------------------------------------------------------
    def _lower(self, expr: Any) -> Any:
        """Lower case over all of Unicode, as SG compares text. SQLite's own lower() is ASCII-only
        but runs in C: it is used for ASCII values (as many bytes as characters), the registered
        Python sg_lower() for the others."""
        if self.store.dialect != "sqlite":
            return sa.func.lower(expr)
        non_ascii = sa.func.length(sa.cast(expr, sa.LargeBinary)) != sa.func.length(expr)  # bytes vs chars
        return sa.case((non_ascii, sa.func.sg_lower(expr)), else_=sa.func.lower(expr))

    def _codepoint_order(self, expr: Any) -> Any:
        """Text sorts by code point whatever the database's collation (SQLite's is binary
        already; a PostgreSQL created with a linguistic locale would order differently)."""
        return expr.collate("C") if self.store.dialect == "postgresql" else expr

    def _sorts(self, sorts: Any) -> list[tuple[Any, str]]:
        """The sort keys as (expression, direction), ending with id ascending."""
        order: list[tuple[Any, str]] = []
        if sorts is None:
            sorts = []
        if not isinstance(sorts, list):
            raise Passthrough("bad-params", "sorts")
        for sort in sorts:
            if not isinstance(sort, Mapping):
                raise Passthrough("bad-params", "sort")
            direction = sort.get("direction", "asc")
            if direction not in ("asc", "desc"):
                raise Passthrough("bad-params", "sort direction")
            alias, fschema, _ = self._walk(sort.get("field_name"))
            info = fieldtypes.TYPES[fschema.data_type]
            if not info.sortable:
                raise Passthrough("sort-type", fschema.data_type)
            if alias is None:
                continue  # through a multi_entity hop every value is None: the key changes nothing
            if info.storage == "entity":
                # by the linked entity's name, case-insensitively; a nameless entity sorts as ""
                reg = self.scope.link(alias, fschema.entity_type, fschema.name)
                expr = sa.case((reg.c.id.is_(None), sa.null()), else_=sa.func.coalesce(self._lower(reg.c.name), ""))
            elif fschema.data_type in _SORT_LOWER:
                expr = self._lower(alias.c[fschema.name])
            elif fschema.data_type == "checkbox":
                expr = sa.func.coalesce(alias.c[fschema.name], False)  # unset (or no linked row) reads false
            else:
                expr = alias.c[fschema.name]
            if info.storage == "entity" or fschema.data_type in _SORT_LOWER:
                expr = self._codepoint_order(expr)
            order.append((expr, direction))
        order.append((self.base.c.id, "asc"))
        return order

    def _paging(self, params: Mapping[str, Any]) -> tuple[int, int, bool]:
        paging = params.get("paging", {"entities_per_page": MAX_PAGE_SIZE, "current_page": 1})
        if not isinstance(paging, Mapping):
            raise Passthrough("bad-params", "paging")
        per_page = paging.get("entities_per_page", MAX_PAGE_SIZE)
        page = paging.get("current_page", 1)
        for value in (per_page, page):
            if not isinstance(value, int) or isinstance(value, bool):
                raise Passthrough("paging", "not an integer")
        if not 1 <= per_page <= MAX_PAGE_SIZE or page < 1 or (page - 1) * per_page > MAX_OFFSET:
            raise Passthrough("paging", f"{per_page}x{page}")
        want_count = params.get("return_paging_info") is True
        without = params.get("return_paging_info_without_counts")
        for flag in (params.get("return_paging_info"), without):
            if flag not in (None, True, False):
                raise Passthrough("bad-params", "paging flag")
        return per_page, (page - 1) * per_page, want_count


def _order(expr: Any, direction: str) -> Any:
    """NULL is the smallest value: first ascending, last descending (see docs/semantics.md)."""
    return expr.asc().nulls_first() if direction == "asc" else expr.desc().nulls_last()


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

