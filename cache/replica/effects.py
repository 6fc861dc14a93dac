"""What a write does besides the fields it sent, and how the proxy keeps the replica right about it.

For each create/update/delete/revive the proxy learns, :class:`WriteEffects`

- applies the other side of every known pair (``cache/replica/pairs.py``) in the write's own
  transaction, through the Store's write functions: ``Task.entity`` set to Shot 1 removes the
  Task from the old Shot's ``tasks`` and appends it to Shot 1's ``tasks``; ``Sequence.shots``
  adding Shot 2 sets Shot 2's ``sg_sequence`` and removes Shot 2 from its former Sequence;
- puts an updated entity's new name into the registry, from which the links to it show it;
- returns pending-write markers (``cache/replica/pending.py``) for what it cannot apply exactly: the
  fields SG sets itself (``updated_at``, ``updated_by``), the fields SG computes from those written
  (:data:`DERIVED`: a Task's schedule, a project's dates, ...), the reverse side of a link field
  whose pair is not known (every cached field of a linked type that can link back), Tasks made
  from a ``task_template``, and the links to an entity that was retired or revived.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..wire import link_key, links_in
from . import fieldtypes
from .pairs import PairRegistry
from .pending import WHOLE_TYPE, Marker
from .store import Store

log = logging.getLogger("sgcache.effects")

#: Fields SG sets on every row a write changes, whatever the write sent.
IMPLICIT_FIELDS = ("updated_at", "updated_by")
#: A Task's schedule: SG's documentation ("Updating Task Dates"): a new start date moves the due
#: date, a new due date or duration changes the other, a milestone drops them; the project's and
#: the assignees' working days enter the calculation; a Task's dependencies move the Tasks
#: downstream of it. SG's answer to an update holds only the fields sent.
SCHEDULE = ("start_date", "due_date", "duration", "milestone", "splits", "est_in_mins")
DEPENDENCIES = frozenset({"upstream_tasks", "downstream_tasks"})
RESCHEDULING = frozenset({*SCHEDULE, "project", "task_assignees", *DEPENDENCIES})


@dataclass(frozen=True)
class Derived:
    """Fields SG recomputes when a write of ``entity_type`` sets certain fields (``on_update``,
    ``on_create``: None for any field, empty for none; ``on_retire``: a delete or revive does)."""

    entity_type: str
    on_update: frozenset[str] | None
    on_create: frozenset[str] | None
    on_retire: bool
    marks: tuple[Marker, ...]
    #: The write may change the written entity's display name: every link showing it is marked.
    renames: bool = False
    #: Whether SG logs the recomputed fields' changes is not known: an event changing a trigger
    #: field has the ingester read the row again (:data:`REFETCHED`).
    refetch: bool = False

    def applies(self, method: str, sent: set[str] | None) -> bool:
        """Whether a ``method`` write sending ``sent`` (None: unknown) recomputes ``marks``."""
        if method in ("delete", "revive"):
            return self.on_retire
        triggers = self.on_update if method == "update" else self.on_create if method == "create" else frozenset()
        return triggers is None or sent is None or bool(sent & triggers)


#: A published file's location: SG resolves a local ``path`` against the site's local storages
#: and fills ``path_cache_storage`` (and the path's own storage keys) itself.
FILE_LOCATION = ("path", "path_cache", "path_cache_storage")

#: A person's name parts: SG composes a HumanUser's ``name`` from ``firstname`` and ``lastname``
#: (a person is created with those two and read back with its name); whether an update of one
#: recomputes the others is not documented, so each marks all three, and the links showing the name.
NAME_PARTS = frozenset({"name", "firstname", "lastname"})

#: What SG computes itself and the answer to a write does not carry. The fields that are not
#: editable in SG's schema besides those SG sets on every write (``Project.start_date`` and
#: ``end_date`` span the project's Tasks; ``Task.time_percent_of_est`` is the time logged over the
#: bid), a Task's schedule, a published file's location, a person's name. A created row is read
#: back whole (cache/proxy/learning.py): only what it moves elsewhere counts.
DERIVED = (
    Derived("Task", RESCHEDULING, DEPENDENCIES, True, tuple(("Task", f) for f in SCHEDULE)),
    Derived("Task", RESCHEDULING, frozenset({*SCHEDULE, *DEPENDENCIES}), True,
            (("Project", "start_date"), ("Project", "end_date"))),
    Derived("Task", frozenset({"est_in_mins"}), frozenset(), False, (("Task", "time_percent_of_est"),)),
    Derived("TimeLog", None, None, True, (("Task", "time_percent_of_est"),)),
    Derived("PublishedFile", frozenset(FILE_LOCATION), frozenset(), False,
            tuple(("PublishedFile", f) for f in FILE_LOCATION)),
    Derived("HumanUser", NAME_PARTS, frozenset(), False, tuple(("HumanUser", f) for f in sorted(NAME_PARTS)),
            renames=True, refetch=True),
)
#: (type, field) whose change event has the ingester read the row again (cache/ingest/apply.py).
REFETCHED = frozenset((rule.entity_type, f) for rule in DERIVED if rule.refetch for f in rule.on_update or ())
#: A field whose value makes SG create rows (the template's Tasks) when an entity is created with it.
TEMPLATE_FIELD = "task_template"
TEMPLATE_ROWS = "Task"

Key = tuple[str, int]
UNKNOWN = None  # the links removed by a write, when the replica cannot tell


class WriteEffects:
    """Side effects of one write, applied or marked, inside the caller's transaction."""

    def __init__(self, store: Store, registry: PairRegistry, conn: Connection):
        self.store = store
        self.schema = store.schema
        self.registry = registry
        self.conn = conn
        self.markers: set[Marker] = set()
        self._primed: dict[str, set[str]] | None = None

    # -- reading the replica -----------------------------------------------------------
    def _is_primed(self, entity_type: str, fname: str) -> bool:
        if self._primed is None:
            self._primed = self.store.primed_fields(self.conn)
        return fname in self._primed.get(entity_type, set())

    def _row_exists(self, entity_type: str, entity_id: int) -> bool:
        table = self.store.tables.get(entity_type)
        if table is None:
            return False
        return self.conn.execute(sa.select(table.c.id).where(table.c.id == entity_id)).first() is not None

    def current(self, entity_type: str, entity_id: int, fname: str) -> list[dict[str, Any]] | None:
        """The links ``entity_type.fname`` of one row holds in the replica; None when unknown."""
        fschema = self.schema.field(entity_type, fname)
        if fschema is None or not fschema.is_link or not self._is_primed(entity_type, fname):
            return None
        table = self.store.tables[entity_type]
        if fieldtypes.TYPES[fschema.data_type].storage == "entity":
            row = self.conn.execute(
                sa.select(table.c[f"{fname}__type"], table.c[f"{fname}__id"]).where(table.c.id == entity_id)
            ).first()
            if row is None:
                return None
            return [] if row[0] is None else [{"type": row[0], "id": int(row[1])}]
        if not self._row_exists(entity_type, entity_id):
            return None
        mt = self.store.multi[(entity_type, fname)]
        rows = self.conn.execute(
            sa.select(mt.c.child_type, mt.c.child_id).where(mt.c.parent_id == entity_id).order_by(mt.c.pos)
        ).all()
        return [{"type": r.child_type, "id": int(r.child_id)} for r in rows]

    # -- the write's link fields ---------------------------------------------------------
    def link_writes(self, entity_type: str, args: Mapping[str, Any]) -> list[tuple[str, str, Any, str]]:
        """(field, kind "entity"/"multi", value, mode) for each link field a create/update sends
        (none when its ``fields`` cannot be read: :func:`field_items`)."""
        out = []
        batch_mode = args.get("multi_entity_update_mode")
        for item in field_items(args) or []:
            fname, value = item["field_name"], item.get("value")
            fschema = self.schema.field(entity_type, fname)
            if fschema is not None:
                if not fschema.is_link:
                    continue
                kind = fieldtypes.TYPES[fschema.data_type].storage
                if kind not in ("entity", "multi"):
                    continue
            elif isinstance(value, list) and value and all(link_key(x) for x in value):
                kind = "multi"
            elif link_key(value) is not None:
                kind = "entity"
            else:
                continue
            mode = item.get("multi_entity_update_mode") or batch_mode or "set"
            if isinstance(mode, Mapping):
                mode = mode.get(fname, "set")
            out.append((fname, kind, value, mode if kind == "multi" else "set"))
        return out

    def snapshot(self, method: str, entity_type: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Before the write is stored: the old value of each link field it sends."""
        old: dict[str, Any] = {}
        entity_id = written_id(args)
        for fname, _kind, _value, _mode in self.link_writes(entity_type, args):
            if method == "create":
                old[fname] = []
            elif entity_id is not None:
                old[fname] = self.current(entity_type, entity_id, fname)
            else:
                old[fname] = UNKNOWN
        return old

    # -- applying ----------------------------------------------------------------------
    def after_write(self, method: str, entity_type: str, args: Mapping[str, Any], result: Any,
                    old: Mapping[str, Any]) -> None:
        """After the write's own row is stored: apply or mark everything else it did."""
        sent = sent_fields(args)
        if method in ("create", "update") and sent is None:
            self.everything()  # what it sends cannot be read: which links it wrote neither
            return
        self._derived(method, entity_type, sent)
        if method in ("delete", "revive"):
            self._retirement(entity_type)
            return
        if not isinstance(result, Mapping) or link_key({"type": entity_type, "id": result.get("id")}) is None:
            return
        entity_id = int(result["id"])
        me: dict[str, Any] = {"type": entity_type, "id": entity_id}
        ident = self.schema.identifier(entity_type)
        if ident and ident in result and (ident != "name" or isinstance(result[ident], str)):
            me["name"] = result[ident]
        if method == "update":
            self._implicit(entity_type)
            self._renamed(entity_type, entity_id, result, sent or set())
        for fname, _kind, value, mode in self.link_writes(entity_type, args):
            new = links_in(result[fname] if fname in result and mode == "set" else value)
            before = old.get(fname, UNKNOWN)
            before_keys = None if before is UNKNOWN else {link_key(x) for x in before}
            if mode == "add":
                added = [x for x in new if before_keys is None or link_key(x) not in before_keys]
                removed: list[dict[str, Any]] | None = []
            elif mode == "remove":
                added = []
                removed = [x for x in new if before_keys is None or link_key(x) in before_keys]
            else:
                new_keys = {link_key(x) for x in new}
                added = [x for x in new if before_keys is None or link_key(x) not in before_keys]
                removed = None if before is UNKNOWN else [x for x in before if link_key(x) not in new_keys]
            self._reverse(entity_type, fname, me, added, removed)
            if fname == TEMPLATE_FIELD and new:
                self._rows_appear(TEMPLATE_ROWS)

    def outcome_unknown(self, method: str, entity_type: str, args: Mapping[str, Any]) -> None:
        """A write whose answer is not stored (lost, or maybe older than the replica): mark
        everything it could have changed. An update changes, on its own row, only the fields it
        sent and those SG sets or recomputes; anything else marks the whole type."""
        sent = sent_fields(args)
        if method in ("create", "update") and sent is None:
            self.everything()  # what it sends cannot be read: which links it wrote neither
            return
        if method == "update" and sent is not None:
            self.markers |= {(entity_type, fname) for fname in sent}
            self._implicit(entity_type)
            if self._may_rename(entity_type, sent):
                self.markers |= self._showing(entity_type)  # the links to it show its name
        else:
            self.markers.add((entity_type, WHOLE_TYPE))
        self._derived(method, entity_type, sent)
        if method in ("delete", "revive"):
            self._retirement(entity_type)
            return
        for fname, _kind, value, _mode in self.link_writes(entity_type, args):
            self._other_sides(self.registry.reverse_fields(self.schema, entity_type, fname,
                                                           self._targets(entity_type, fname)))
            if fname == TEMPLATE_FIELD and value:
                self._rows_appear(TEMPLATE_ROWS)

    def everything(self) -> None:
        """Mark every cached type: a write whose arguments cannot be read could have changed anything."""
        self.markers |= {(t, WHOLE_TYPE) for t in self.schema.entities}

    def _targets(self, entity_type: str, fname: str) -> list[str]:
        fschema = self.schema.field(entity_type, fname)
        if fschema is not None and fschema.links:
            return list(fschema.links)
        return sorted(self.schema.entities)  # not cached, or any type: every cached type may be linked

    def _reverse(self, entity_type: str, fname: str, me: dict[str, Any], added: list[dict[str, Any]],
                 removed: list[dict[str, Any]] | None) -> None:
        """The other side of ``entity_type.fname`` for the links added to and removed from ``me``."""
        if removed is UNKNOWN:
            # the replica did not know the old value: whatever it linked may have changed
            self._other_sides(self.registry.reverse_fields(self.schema, entity_type, fname,
                                                           self._targets(entity_type, fname)))
            self.markers.add((entity_type, fname))  # rows of this type that lost a link (entity reverse)
            removed = []
        for link, adding in [(x, False) for x in removed] + [(x, True) for x in added]:
            target, target_id = link_key(link)  # type: ignore[misc]
            reverse = self.registry.reverse(entity_type, fname, target)
            if reverse is None:
                self._other_sides(self.registry.reverse_fields(self.schema, entity_type, fname, [target]))
                continue
            rschema = self.schema.field(target, reverse)
            if rschema is None:
                continue  # the other side is not cached: nothing to keep in step
            self._implicit(target)
            if not self._is_primed(target, reverse) or not self._row_exists(target, target_id):
                self.markers.add((target, reverse))
                continue
            if fieldtypes.TYPES[rschema.data_type].storage == "multi":
                self.store.change_multi(self.conn, target, target_id, reverse,
                                        added=[me] if adding else (), removed=() if adding else [me],
                                        source="proxy")
            else:
                self._set_entity_side(target, target_id, reverse, me, adding)

    def _set_entity_side(self, target: str, target_id: int, fname: str, me: dict[str, Any], adding: bool) -> None:
        """The single-entity side of a pair (``Shot.sg_sequence`` for ``Sequence.shots``)."""
        prev = self.current(target, target_id, fname)
        prev_link = prev[0] if prev else None
        if adding:
            if link_key(prev_link) == link_key(me):
                return
            self.store.write_entities(self.conn, target, [{"id": target_id, fname: me}], "proxy")
            if prev_link is not None:
                # it moves: the entity it linked before loses it on its side of the pair
                self._reverse(target, fname, {"type": target, "id": target_id}, [], [prev_link])
        elif link_key(prev_link) == link_key(me):
            self.store.write_entities(self.conn, target, [{"id": target_id, fname: None}], "proxy")

    def _other_sides(self, fields: set[Marker]) -> None:
        """Mark the other side of a link write whose pair is not known (``fields``), and what SG
        sets on each row it changes there (as for a known pair's other side, :meth:`_reverse`)."""
        self.markers |= fields
        for entity_type in {t for t, _ in fields}:
            self._implicit(entity_type)

    def _implicit(self, entity_type: str) -> None:
        for fname in IMPLICIT_FIELDS:
            if self.schema.field(entity_type, fname) is not None:
                self.markers.add((entity_type, fname))

    def _rows_appear(self, entity_type: str) -> None:
        """SG creates rows of ``entity_type`` the proxy does not see: the whole type, and the other
        side of each of its link fields, wait for the ingester."""
        self.markers.add((entity_type, WHOLE_TYPE))
        entity = self.schema.entities.get(entity_type)
        if entity is None:
            return
        for fschema in entity.fields.values():
            if fschema.is_link:
                self._other_sides(self.registry.reverse_fields(self.schema, entity_type, fschema.name,
                                                               fschema.links))

    def _retirement(self, entity_type: str) -> None:
        """An entity was retired or revived: links to it read right from the registry, but what SG
        does to the rows linking it (and to rows it owns) is not modelled."""
        self._implicit(entity_type)
        for owner, fschema in self._links_to(entity_type):
            self.markers.add((owner, fschema.name))
            back = self.registry.reverse(owner, fschema.name, entity_type)
            if back is not None and fieldtypes.TYPES[fschema.data_type].storage == "entity":
                self.markers.add((owner, WHOLE_TYPE))  # rows it owns (a Shot's Tasks)

    def _links_to(self, entity_type: str) -> list[tuple[str, Any]]:
        """(type, field schema) of every cached link field that can link to ``entity_type``."""
        return [(entity.name, fschema) for entity in self.schema.entities.values()
                for fschema in entity.fields.values() if fschema.is_link and entity_type in fschema.links]

    def _showing(self, entity_type: str) -> set[Marker]:
        """Markers for every cached link field that can show an ``entity_type`` entity's name."""
        return {(owner, fschema.name) for owner, fschema in self._links_to(entity_type)}

    def _may_rename(self, entity_type: str, sent: set[str]) -> bool:
        """Whether an update sending ``sent`` may change the name the links to ``entity_type`` show:
        it sends the type's name field, or any field when that one is not known (a cached type whose
        name field is not cached: which of SG's fields gives its links their name is not certain)."""
        ident = self.schema.identifier(entity_type)
        return bool(sent) if ident is None else ident in sent

    def _renamed(self, entity_type: str, entity_id: int, result: Mapping[str, Any],
                 sent: set[str]) -> None:
        """An update of an uncached type's name: the links to it show it from the registry, where
        the new name goes (a cached type's row write puts it there); a name that is no string or
        None marks those links instead, and so does any update of a type whose name field is not
        known (``sent``: the fields it sent)."""
        ident = self.schema.identifier(entity_type)
        if ident is None:
            if self._may_rename(entity_type, sent):
                self.markers |= self._showing(entity_type)
            return
        if entity_type in self.store.tables or ident not in result:
            return
        name = result[ident]
        if name is not None and not isinstance(name, str):
            self.markers |= self._showing(entity_type)
            return
        self.store.note_links(self.conn, [{"type": entity_type, "id": entity_id, "name": name}])

    def _derived(self, method: str, entity_type: str, sent: set[str] | None) -> None:
        """Mark what SG recomputes after this write, which sent the fields ``sent`` (None: unknown;
        :data:`DERIVED`), type-wide: the rows it recomputes may be others than the written one."""
        for rule in DERIVED:
            if rule.entity_type == entity_type and rule.applies(method, sent):
                self.markers |= {m for m in rule.marks if self.schema.field(*m) is not None}
                if rule.renames:
                    self.markers |= self._showing(entity_type)


def field_items(args: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The items of a create's or update's ``fields`` list (none when it sends none); None when
    it is not a list of items that each name a field (a client may send any JSON there)."""
    items = args.get("fields")
    if items is None:
        return []
    if not isinstance(items, list) or not all(
            isinstance(item, Mapping) and isinstance(item.get("field_name"), str) for item in items):
        return None
    return items


def sent_fields(args: Mapping[str, Any]) -> set[str] | None:
    """The field names a create's or update's ``fields`` list sends; None when it cannot be read."""
    items = field_items(args)
    return None if items is None else {item["field_name"] for item in items}


def written_id(args: Mapping[str, Any]) -> int | None:
    """The id a write names, as SG reads it: an int, or a float with an integral value (an id that
    went through pandas or another tool's JSON); None for anything else (a bool included)."""
    value = args.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None

