"""The one write path into the replica: a batch of writes flushed with upserts.

Every writer -- the ingester (a poll), the scanner (a page), the proxy (what it learns from a
write passing by) and the fetches of whole rows -- buffers its changes in a :class:`WriteBatch`
bound to its transaction and flushes them before the commit. The batch reads the rows it
changes once, changes them in memory, and writes:

1. entity rows: new rows with ``INSERT .. ON CONFLICT (id) DO UPDATE`` of the columns the
   writer knows, changed rows with an UPDATE of the changed columns only (a field written by
   another writer meanwhile is left alone);
2. multi_entity links: DELETE of removed links, ``INSERT .. ON CONFLICT DO UPDATE`` (``pos``)
   of the others;
3. change-log records (``sgcache_changes``): a field's old and new value, a row created
   (field None), or a row a proxy wrote (:data:`WRITTEN`, whether it changed or not);
4. the registry (``sgcache_entities``): names, retired flags and unknown entities, with the
   same upsert;
5. the fetch queue, and the link searches of revivals with their pending-write markers.

Rows are written in sorted key order (table, then primary key) and consecutive rows of the same
shape go in one executemany (registry rows: one executemany per shape, each in key order); a row another transaction inserted after this one read the table is
updated, never a unique-key error.

On PostgreSQL a flush first takes a transaction-level advisory lock (one per database and
schema), so write transactions run their flushes one at a time from their first flush to their
commit: a transaction that flushes more than once (the proxy learning a ``batch`` of requests,
an ingester poll in careful mode) cannot lock rows in an order that deadlocks with another's.
The lock is held only from the flush to the commit; SQLite serializes writers anyway
(``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..wire import chunks
from . import fetchqueue, fieldtypes, linksearch, pending

log = logging.getLogger("sgcache.writes")

Key = tuple[str, int]
LinkKey = tuple[str, str, int]  # (type, multi_entity field, parent id)
CHUNK = 500
#: Link-table SELECTs :meth:`WriteBatch.load_links` joins in one UNION ALL statement.
LINK_SELECTS = 16
#: The change-log source of what a proxy learnt from a write passing by.
PROXY = "proxy"
#: The change-log record a proxy leaves on every row it writes, whether its values changed or not.
WRITTEN = "*"


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _links_json(links: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": link["type"], "id": link["id"]} for link in links]


def _runs(ops: Iterable[tuple[Any, dict[str, Any]]]) -> Iterable[tuple[Any, list[dict[str, Any]]]]:
    """Consecutive (shape, row) pairs of the same shape -> (shape, rows), order kept."""
    shape: Any = None
    rows: list[dict[str, Any]] = []
    for each_shape, row in ops:
        if rows and each_shape != shape:
            yield shape, rows
            rows = []
        shape = each_shape
        rows.append(row)
    if rows:
        yield shape, rows


def _links_after(current: Mapping[Key, int], added: Sequence[Mapping[str, Any]],
                 removed: Sequence[Mapping[str, Any]]) -> tuple[dict[Key, int], bool]:
    """A multi_entity list (child -> position) after an ``added``/``removed`` change, and whether
    it changed."""
    after = dict(current)
    changed = False
    for link in removed:
        if after.pop((link["type"], int(link["id"])), None) is not None:
            changed = True
    keys = list(dict.fromkeys((link["type"], int(link["id"])) for link in added))
    order = sorted(after, key=after.__getitem__)
    if keys and order[len(order) - len(keys):] != keys:
        # SG appends added links: one already here (a proxy learned it, perhaps before a
        # concurrent write SG applied first) moves to the end, so the events leave SG's order;
        # an event applied again finds its links at the end already and changes nothing
        pos = max(after.values(), default=-1) + 1
        for child in keys:
            after.pop(child, None)
            after[child] = pos
            pos += 1
        changed = True
    return after, changed


class WriteBatch:
    """The writes of one transaction on ``conn``; :meth:`flush` writes them (call it before commit)."""

    def __init__(self, store: Any, conn: Connection, source: str = "event"):
        self.store = store
        self.conn = conn
        self.source = source
        self.rows: dict[Key, dict[str, Any] | None] = {}  # replica rows as loaded and changed
        self.new: dict[Key, set[str]] = {}  # rows to insert -> the columns the writer knows
        self.dirty: dict[Key, dict[str, Any]] = {}  # changed columns of existing rows
        self.logs: list[dict[str, Any]] = []
        self.names: dict[Key, Any] = {}
        self.unnamed: set[Key] = set()
        self.retired: dict[Key, bool] = {}
        self.registered: set[Key] = set()  # keys that must have a registry row (new entity rows)
        self.fetch: dict[Key, str] = {}
        self.unfetch: set[Key] = set()
        self.searches: set[Key] = set()  # revived entities whose linking rows SG must be asked for
        self.revived_seen: set[Key] = set()  # rows a re-read found live that the replica held retired
        self.links: dict[LinkKey, dict[Key, int]] = {}
        self.links_orig: dict[LinkKey, dict[Key, int]] = {}

    # -- reading what is changed -------------------------------------------------------
    def load(self, keys: Iterable[Key]) -> None:
        """Read the replica rows of these (cached type, id) pairs, one query per type and chunk."""
        wanted: dict[str, set[int]] = {}
        for entity_type, entity_id in keys:
            if entity_type in self.store.tables and (entity_type, entity_id) not in self.rows:
                wanted.setdefault(entity_type, set()).add(int(entity_id))
        for entity_type, ids in wanted.items():
            table = self.store.tables[entity_type]
            for chunk in chunks(sorted(ids), CHUNK):
                for row in self.conn.execute(_rows_by_id(table), {"ids": chunk}):
                    self.rows[(entity_type, row.id)] = dict(row._mapping)
            for entity_id in ids:
                self.rows.setdefault((entity_type, entity_id), None)

    def load_links(self, keys: Iterable[LinkKey]) -> None:
        """Read the multi_entity links of these (type, field, parent id), one query per field and chunk."""
        wanted: dict[tuple[str, str], set[int]] = {}
        for entity_type, fname, parent in keys:
            if (entity_type, fname) in self.store.multi and (entity_type, fname, parent) not in self.links:
                wanted.setdefault((entity_type, fname), set()).add(int(parent))
        fields = sorted(wanted)
        selects = []
        for n, field in enumerate(fields):
            table = self.store.multi[field]
            for chunk in chunks(sorted(wanted[field]), CHUNK):
                selects.append(sa.select(sa.literal(n).label("field"), table.c.parent_id, table.c.child_type,
                                         table.c.child_id, table.c.pos).where(table.c.parent_id.in_(chunk)))
        found: dict[tuple[int, int], list[tuple[int, Key]]] = {}
        # several fields' tables in one statement (a row with many multi_entity fields was a round
        # trip per field on PostgreSQL); each parent's links ordered by pos here
        for group in chunks(selects, LINK_SELECTS):
            stmt = group[0] if len(group) == 1 else sa.union_all(*group)
            for r in self.conn.execute(stmt):
                found.setdefault((r.field, r.parent_id), []).append((r.pos, (r.child_type, r.child_id)))
        for n, (entity_type, fname) in enumerate(fields):
            for parent in wanted[(entity_type, fname)]:
                children = {child: pos for pos, child in sorted(found.get((n, parent), ()))}
                self.links[(entity_type, fname, parent)] = children
                self.links_orig[(entity_type, fname, parent)] = dict(children)

    def exists(self, key: Key) -> bool:
        if key not in self.rows:
            self.load([key])
        return self.rows.get(key) is not None

    # -- buffering writes ----------------------------------------------------------------
    def log_change(self, key: Key, field_name: str | None, old: Any, new: Any,
                   event_id: int | None = None, source: str | None = None) -> None:
        """One change-log record (``field_name`` None: the row was created)."""
        self.logs.append({"at": self.store.now(), "source": source or self.source, "event_id": event_id,
                          "entity_type": key[0], "entity_id": key[1], "field_name": field_name,
                          "old": _json_or_none(old), "new": _json_or_none(new)})

    def put(self, entity_type: str, records: Sequence[Mapping[str, Any]], *, complete: bool = False,
            retired: bool | None = None, event_id: int | None = None, log_changes: bool = True) -> Any:
        """Upsert SG entity dicts of one type (what ``Store.write_entities`` documents)."""
        from .store import WriteResult, field_changes

        result = WriteResult(to_fetch=[])
        if entity_type not in self.store.tables or not records:
            return result
        entity = self.store.schema.entities[entity_type]
        cached = {f: s for f, s in entity.fields.items() if f != "id" and fieldtypes.is_cached_type(s.data_type)}
        multi_fields = [f for f, s in cached.items() if fieldtypes.TYPES[s.data_type].storage == "multi"]
        keys = [(entity_type, int(r["id"])) for r in records]
        self.load(keys)
        self.load_links((entity_type, f, int(r["id"])) for r in records for f in multi_fields if f in r)
        identifier = entity.name_field
        # SG's own reading of a row (a fetch, a scan, a read-back): a link it shows as None may be
        # to an entity retired now, which the row keeps (see _keep_hidden_links); a write's answer
        # states the value set, which is stored as it is
        as_read = complete or self.source != PROXY
        entity_fields = [f for f, s in cached.items() if fieldtypes.TYPES[s.data_type].storage == "entity"]
        for record, key in zip(records, keys, strict=True):
            row = self.rows.get(key)
            if row is None and not complete and any(f not in record for f in cached):
                result.to_fetch.append(key)
                if identifier in record:  # links to it show its name from the registry meanwhile
                    self.names[key] = record[identifier]
                continue
            try:
                values, multis, links = self.store.encode_record(entity_type, cached, record)
            except ValueError as exc:
                log.warning("not storing %s %s: %s", entity_type, key[1], exc)
                result.to_fetch.append(key)
                continue
            if retired is not None:
                values["_retired"] = retired
            if as_read and row is not None:
                self._keep_hidden_links(row, values, entity_fields)
                if retired is False and row.get("_retired") and self.source != PROXY:
                    self.revived_seen.add(key)  # a revival no event brought (a reconcile found it)
            existed = row is not None
            if row is None:
                table = self.store.tables[entity_type]
                row = {c.name: None for c in table.columns}
                row.update(values, id=key[1], _retired=bool(values.get("_retired", False)))
                self.rows[key] = row
                self.new[key] = set(values) | {"id"}
                self.registered.add(key)
                if log_changes:
                    self.log_change(key, None, None, None, event_id)
                result.inserted += 1
            else:
                diff = {col: new for col, new in values.items() if row[col] != new}
                if diff:
                    if log_changes:
                        for fname, (before, after) in field_changes(diff, row).items():
                            self.log_change(key, fname, before, after, event_id)
                    row.update(diff)
                    self._mark(key, diff)
                    result.changed += 1
            for fname, value in multis.items():
                if self.replace_links(key, fname, value, event_id, log_changes) and existed:
                    result.changed += 1
            self._log_written(key)
            self.note(links)
            if identifier in record:
                self.names[key] = record[identifier]
            if retired is not None:
                self.retired[key] = retired
        return result

    def _keep_hidden_links(self, row: Mapping[str, Any], values: dict[str, Any], entity_fields: Sequence[str]) -> None:
        """SG shows a single-entity link to a retired entity as None, and the link again on its
        revival, with no event for the linking row: where SG's row says None and the replica's row
        links an entity retired now, the link is kept (it reads as None while that entity is
        retired, as a multi_entity list keeps its hidden links, :meth:`replace_links`). The
        revival reads such rows again (:meth:`linking`): one SG cleared meanwhile then reads as SG has it."""
        held: dict[str, Key] = {}
        for fname in entity_fields:
            tcol, icol = f"{fname}__type", f"{fname}__id"
            if (tcol in values and values[tcol] is None and values.get(icol) is None
                    and row.get(tcol) is not None and row.get(icol) is not None):
                held[fname] = (row[tcol], int(row[icol]))
        if not held:
            return
        hidden = self.retired_now(sorted(set(held.values())))
        for fname, child in held.items():
            if child in hidden:
                del values[f"{fname}__type"], values[f"{fname}__id"]

    def drops_live_links(self, entity_type: str, records: Sequence[Mapping[str, Any]]) -> set[int]:
        """The ids among ``records`` (SG's rows as read) whose replica row links an entity that the
        record leaves out (a single-entity field None, a link missing from a multi_entity list)
        while the replica holds that entity live: SG cleared the link, or retired the entity and
        its event is not applied yet (the replica cannot tell which; cache/ingest/fetch.py waits)."""
        return set(self.live_links_left_out(entity_type, records))

    def live_links_left_out(self, entity_type: str, records: Sequence[Mapping[str, Any]]) -> dict[int, set[Key]]:
        """:meth:`drops_live_links` with, for each id, the live entities its record leaves out."""
        if entity_type not in self.store.tables or not records:
            return {}
        entity = self.store.schema.entities[entity_type]
        storage = {f: fieldtypes.TYPES[s.data_type].storage for f, s in entity.fields.items()
                   if f != "id" and fieldtypes.is_cached_type(s.data_type)}
        keys = [(entity_type, int(r["id"])) for r in records]
        self.load(keys)
        self.load_links((entity_type, f, k[1]) for r, k in zip(records, keys, strict=True)
                        for f, kind in storage.items() if kind == "multi" and f in r)
        left_out: dict[int, set[Key]] = {}
        for record, key in zip(records, keys, strict=True):
            row = self.rows.get(key)
            if row is None:
                continue
            children: set[Key] = set()
            for fname, kind in storage.items():
                if fname not in record:
                    continue
                value = record[fname]
                if kind == "entity" and value is None and row.get(f"{fname}__id") is not None:
                    children.add((row[f"{fname}__type"], int(row[f"{fname}__id"])))
                elif kind == "multi" and (entity_type, fname) in self.store.multi:
                    shown = {(x.get("type"), x.get("id")) for x in value or [] if isinstance(x, Mapping)}
                    children.update(c for c in self.links.get((entity_type, fname, key[1]), {}) if c not in shown)
            if children:
                left_out[key[1]] = children
        if not left_out:
            return {}
        hidden = self.retired_now(sorted(set().union(*left_out.values())))
        return {i: children - hidden for i, children in left_out.items() if children - hidden}

    def linking(self, keys: Iterable[Key]) -> set[Key]:
        """The cached rows whose link fields (single-entity, multi_entity) link one of ``keys``, as
        the replica holds them: links hidden while it is retired included (SG's event rows left
        out: they never change). One query per link field that can link one of their types."""
        by_type: dict[str, set[int]] = {}
        for entity_type, entity_id in keys:
            by_type.setdefault(entity_type, set()).add(int(entity_id))
        wanted = {(t, i) for t, ids in by_type.items() for i in ids}
        out: set[Key] = set()
        for t, ids in by_type.items():
            for owner, fname, storage in linksearch.link_fields(self.store, t, events=False):
                if storage == "entity":
                    table = self.store.tables[owner]
                    tcol, icol = table.c[f"{fname}__type"], table.c[f"{fname}__id"]
                    for chunk in chunks(sorted(ids), CHUNK):
                        rows = self.conn.execute(sa.select(table.c.id).where(icol.in_(chunk) & (tcol == t)))
                        out.update((owner, int(r.id)) for r in rows)
                    out.update(k for k, row in self.rows.items()
                               if k[0] == owner and row is not None and row.get(f"{fname}__id") is not None
                               and (row.get(f"{fname}__type"), int(row[f"{fname}__id"])) in wanted)
                else:
                    mt = self.store.multi[(owner, fname)]
                    for chunk in chunks(sorted(ids), CHUNK):
                        rows = self.conn.execute(sa.select(mt.c.parent_id)
                                                 .where(mt.c.child_id.in_(chunk) & (mt.c.child_type == t)))
                        out.update((owner, int(r.parent_id)) for r in rows)
                    out.update((owner, parent) for (o, f, parent), children in self.links.items()
                               if o == owner and f == fname and not wanted.isdisjoint(children))
        return out

    def search_linking(self, keys: Iterable[Key]) -> None:
        """Ask SG, at the ingester's next fetch, which rows link these revived entities (rows the
        replica first read while one was retired lack the link SG shows again: see
        cache/replica/linksearch.py); the link fields that can link them are marked pending
        (their reads pass) until those rows are read again."""
        keys = sorted({(t, int(i)) for t, i in keys})
        linkable = {t for t in {t for t, _i in keys} if linksearch.link_fields(self.store, t)}
        self.searches.update(k for k in keys if k[0] in linkable)

    def _mark(self, key: Key, diff: Mapping[str, Any]) -> None:
        if key in self.new:
            self.new[key].update(diff)
        else:
            self.dirty.setdefault(key, {}).update(diff)

    def write(self, key: Key, record: Mapping[str, Any], event_id: int | None = None) -> bool:
        """Change some scalar/entity fields of a loaded row; False when the row is unknown or a
        value does not fit (multi_entity values are not accepted here)."""
        from .store import field_changes

        entity = self.store.schema.entities[key[0]]
        fields = {f: entity.fields[f] for f in record if f in entity.fields and f != "id"}
        try:
            values, multis, links = self.store.encode_record(key[0], fields, record)
        except ValueError as exc:
            log.info("event %s: %s %s: %s", event_id, key[0], key[1], exc)
            return False
        row = self.rows.get(key)
        if multis or row is None:
            return False
        diff = {col: new for col, new in values.items() if row[col] != new}
        for fname, (before, after) in field_changes(diff, row).items():
            self.log_change(key, fname, before, after, event_id)
        row.update(diff)
        if diff:
            self._mark(key, diff)
        if entity.name_field in record:
            self.names[key] = record[entity.name_field]
        self.note(links)
        return True

    def holds(self, key: Key, fname: str, value: Any) -> bool:
        """Whether the loaded row's scalar/entity field ``fname`` equals ``value`` (as SG sends it)."""
        row = self.rows.get(key)
        fschema = self.store.schema.field(key[0], fname)
        if row is None or fschema is None:
            return False
        try:
            values, multis, _links = self.store.encode_record(key[0], {fname: fschema}, {fname: value})
        except (ValueError, TypeError):
            return False
        return not multis and all(row.get(col) == v for col, v in values.items())

    def replace_links(self, key: Key, fname: str, value: Sequence[Mapping[str, Any]],
                      event_id: int | None = None, log_changes: bool = True) -> bool:
        """Set a multi_entity field to ``value`` (order kept, duplicates dropped).

        ``value`` is what SG shows, and SG leaves links to retired entities out of what it shows
        while it keeps them (they show again on revival, with no event): a link the replica
        holds to an entity retired now is kept, in its place after the link it followed."""
        lkey = (key[0], fname, key[1])
        if lkey not in self.links:
            self.load_links([lkey])
        current = self.links[lkey]
        shown: list[Key] = []
        for link in value:
            child = (link["type"], int(link["id"]))
            if child not in shown:
                shown.append(child)
        hidden = self.retired_now([c for c in current if c not in set(shown)])
        order = sorted(current, key=current.__getitem__)
        after: dict[Key | None, list[Key]] = {}
        previous: Key | None = None
        for child in order:
            if child in hidden:
                after.setdefault(previous, []).append(child)
            elif child in shown:
                previous = child
        merged = list(after.get(None, []))
        for child in shown:
            merged.append(child)
            merged.extend(after.get(child, []))
        wanted = {child: pos for pos, child in enumerate(merged)}
        if list(current.items()) == list(wanted.items()):
            return False
        self.links[lkey] = wanted
        if log_changes:
            self.log_change(key, fname, None, [{"type": t, "id": i} for t, i in wanted], event_id)
        return True

    def retired_now(self, children: Sequence[Key]) -> set[Key]:
        """Which of these linked entities are retired (this batch's retirements first, then the registry)."""
        if not children:
            return set()
        out = {c for c in children if self.retired.get(c)}
        unknown = [c for c in children if c not in self.retired]
        reg = self.store.entities
        for chunk in chunks(unknown, 200):
            rows = self.conn.execute(
                sa.select(reg.c.type, reg.c.id).where(reg.c.retired.is_(True))
                .where(sa.or_(*[(reg.c.type == t) & (reg.c.id == i) for t, i in chunk]))
            ).all()
            out.update((r.type, int(r.id)) for r in rows)
        return out

    def change_links(self, key: Key, fname: str, added: Sequence[Mapping[str, Any]],
                     removed: Sequence[Mapping[str, Any]], event_id: int | None = None) -> bool:
        """An ``added``/``removed`` change of a multi_entity field; idempotent; True when it changed."""
        lkey = (key[0], fname, key[1])
        if lkey not in self.links:
            self.load_links([lkey])
        after, changed = _links_after(self.links[lkey], added, removed)
        self.links[lkey] = after
        if added:
            self.note(added)
        if changed:
            self.log_change(key, fname, _links_json(removed), _links_json(added), event_id)
        return changed

    def links_would_change(self, key: Key, fname: str, added: Sequence[Mapping[str, Any]],
                           removed: Sequence[Mapping[str, Any]]) -> bool:
        """Whether :meth:`change_links` would change the list (nothing is changed here)."""
        lkey = (key[0], fname, key[1])
        if lkey not in self.links:
            self.load_links([lkey])
        return _links_after(self.links[lkey], added, removed)[1]

    def keeps_links(self, key: Key, fname: str, added: Sequence[Mapping[str, Any]],
                    removed: Sequence[Mapping[str, Any]]) -> bool:
        """Whether the list holds links that an ``added``/``removed`` change leaves where they are
        (neither removed nor added again): with nothing added, two or more of them."""
        lkey = (key[0], fname, key[1])
        if lkey not in self.links:
            self.load_links([lkey])
        moved = {(link["type"], int(link["id"])) for link in [*added, *removed]}
        kept = [child for child in self.links[lkey] if child not in moved]
        return len(kept) >= (1 if added else 2)

    def is_retired(self, key: Key) -> bool | None:
        """The loaded row's retired flag (None: no such row)."""
        if not self.exists(key):
            return None
        row = self.rows[key]
        assert row is not None
        return bool(row["_retired"])

    def retire(self, key: Key, retired: bool, event_id: int | None = None) -> bool:
        """Set an entity's retired flag (row and registry); True when the row changed."""
        changed = False
        if key[0] in self.store.tables and self.exists(key):
            row = self.rows[key]
            assert row is not None
            if row["_retired"] != retired:
                self.log_change(key, "retired", not retired, retired, event_id)
                row["_retired"] = retired
                self._mark(key, {"_retired": retired})
                changed = True
        self.retired[key] = retired
        self._log_written(key)
        return changed

    def _log_written(self, key: Key) -> None:
        """A proxy wrote this row (changed or not): the ingester reads SG's row rather than apply
        an event that would change it, until it has caught up past this write (cache/ingest/apply.py)."""
        if self.source == PROXY:
            self.log_change(key, WRITTEN, None, None)

    def linked_from(self, key: Key) -> set[Key]:
        """The cached entities this row links to, through its entity and multi_entity fields
        (as the replica holds them, links to retired entities included)."""
        if not self.exists(key):
            return set()
        row = self.rows[key]
        assert row is not None
        out: set[Key] = set()
        fields = self.store.schema.entities[key[0]].fields
        self.load_links((key[0], fname, key[1]) for fname in fields if (key[0], fname) in self.store.multi)
        for fname, fschema in fields.items():
            storage = fieldtypes.TYPES[fschema.data_type].storage if fschema.data_type in fieldtypes.TYPES else None
            if storage == "entity":
                t, i = row.get(f"{fname}__type"), row.get(f"{fname}__id")
                if t is not None and i is not None:
                    out.add((t, int(i)))
            elif storage == "multi" and (key[0], fname) in self.store.multi:
                out.update(self.links[(key[0], fname, key[1])])
        return {k for k in out if k[0] in self.store.tables}

    def note(self, links: Iterable[Mapping[str, Any]]) -> None:
        """Registry: remember linked entities and their names (the last name wins)."""
        for link in links:
            key = (link["type"], int(link["id"]))
            if "name" in link:
                self.names[key] = link["name"]
            else:
                self.unnamed.add(key)

    def queue(self, key: Key, reason: str) -> None:
        """Ask for a re-read of this entity from SG (reads of its type pass meanwhile)."""
        if key[0] in self.store.schema:
            self.fetch.setdefault((key[0], int(key[1])), reason)
            self.unfetch.discard((key[0], int(key[1])))

    def unqueue(self, keys: Iterable[Key]) -> None:
        """Drop entities from the fetch queue."""
        for entity_type, entity_id in keys:
            key = (entity_type, int(entity_id))
            self.unfetch.add(key)
            self.fetch.pop(key, None)

    def _revived_by_a_read(self) -> None:
        """Rows a re-read (a scan's page, a fetch) found live while the replica held them retired:
        a revival whose event the ingester never applied. As for a revival event
        (cache/ingest/apply.py): the rows linking them, and those they link through a pair, are
        read again, and SG is asked which rows link them (cache/replica/linksearch.py)."""
        revived, self.revived_seen = sorted(self.revived_seen), set()
        for other in sorted(set().union(*(self.linked_from(key) for key in revived)) - set(revived)):
            self.queue(other, "linked to a revived entity")
        self.read_around_revivals(revived)

    def read_around_revivals(self, keys: Iterable[Key]) -> None:
        """After these entities' revival: queue for a re-read the rows linking them as the replica
        holds them (:meth:`linking`: SG may have removed a hidden link meanwhile), and a search of
        SG for the rows the replica does not know link them (:meth:`search_linking`)."""
        revived = sorted({(t, int(i)) for t, i in keys})
        for other in sorted(self.linking(revived) - set(revived)):
            self.queue(other, "links to a revived entity")
        self.search_linking(revived)

    # -- writing -------------------------------------------------------------------------
    def pending(self) -> bool:
        """Whether anything is buffered."""
        return bool(self.new or self.dirty or self.logs or self.names or self.unnamed or self.retired
                    or self.registered or self.fetch or self.unfetch or self.searches
                    or any(v != self.links_orig.get(k, {}) for k, v in self.links.items()))

    def flush(self) -> None:
        """Write everything buffered, in the fixed order of the module docstring."""
        if not self.pending():
            return
        if self.revived_seen:
            self._revived_by_a_read()
        self.store.dialect.lock_writes(self.conn)  # see the module docstring
        self._flush_rows()
        self._flush_links()
        if self.logs:
            self.conn.execute(self.store.changes.insert(), self.logs)
        self._flush_registry()
        self._flush_queue()
        self.new, self.dirty, self.logs = {}, {}, []
        self.names, self.unnamed, self.retired, self.registered = {}, set(), {}, set()
        self.fetch, self.unfetch, self.searches = {}, set(), set()
        self.links_orig = {k: dict(v) for k, v in self.links.items()}

    def _flush_rows(self) -> None:
        upsert = self.store.dialect.upsert
        keys = sorted(set(self.new) | set(self.dirty))
        for entity_type in sorted({k[0] for k in keys}):
            table = self.store.tables[entity_type]
            ops: list[tuple[Any, dict[str, Any]]] = []
            for key in (k for k in keys if k[0] == entity_type):
                row = self.rows[key]
                assert row is not None
                if key in self.new:
                    ops.append((("upsert", tuple(sorted(self.new[key]))), dict(row)))
                else:
                    cols = self.dirty[key]
                    ops.append((("update", tuple(sorted(cols))), {"p_id": key[1],
                                                                  **{f"p_{c}": v for c, v in cols.items()}}))
            for (kind, cols), rows in _runs(ops):
                if kind == "upsert":
                    self.conn.execute(upsert(table, ["id"], cols), rows)
                else:
                    self.conn.execute(_update_by_id(table, cols), rows)

    def _flush_links(self) -> None:
        by_table: dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        for (entity_type, fname, parent) in sorted(self.links):
            current = self.links[(entity_type, fname, parent)]
            orig = self.links_orig.get((entity_type, fname, parent), {})
            if current == orig:
                continue
            gone, new = by_table.setdefault((entity_type, fname), ([], []))
            gone.extend({"p_parent": parent, "p_type": t, "p_id": i}
                        for (t, i) in sorted(orig) if (t, i) not in current)
            new.extend({"parent_id": parent, "child_type": t, "child_id": i, "pos": pos}
                       for (t, i), pos in sorted(current.items()) if orig.get((t, i)) != pos)
        for key in sorted(by_table):
            gone, new = by_table[key]
            table = self.store.multi[key]
            if gone:
                self.conn.execute(table.delete().where(
                    (table.c.parent_id == sa.bindparam("p_parent")) & (table.c.child_type == sa.bindparam("p_type"))
                    & (table.c.child_id == sa.bindparam("p_id"))), gone)
            if new:
                self.conn.execute(self.store.dialect.upsert(table, ["parent_id", "child_type", "child_id"], ["pos"]),
                                  new)

    def _flush_registry(self) -> None:
        """``sgcache_entities``: names, retired flags, unknown entities; only what differs is written.

        A retired flag alone never makes a registry row for a cached type (its row is what counts)."""
        reg = self.store.entities
        keys = set(self.names) | self.unnamed | set(self.retired) | self.registered
        if not keys:
            return
        by_type: dict[str, list[int]] = {}
        for t, i in keys:
            by_type.setdefault(t, []).append(i)
        existing: dict[Key, Any] = {}
        for t, ids in by_type.items():
            for chunk in chunks(sorted(ids), CHUNK):
                for r in self.conn.execute(sa.select(reg).where((reg.c.type == t) & reg.c.id.in_(chunk))):
                    existing[(r.type, r.id)] = r
        ops: list[tuple[Any, dict[str, Any]]] = []
        for key in sorted(keys):
            want: dict[str, Any] = {}
            if key in self.names:
                want.update(name=self.names[key], name_known=True)
            if key in self.retired:
                want["retired"] = self.retired[key]
            old = existing.get(key)
            if old is None:
                retired_only = (key[0] in self.store.tables and key not in self.names and key not in self.unnamed
                                and key not in self.registered)
                if retired_only:
                    continue
                row = {"type": key[0], "id": key[1], "name": want.get("name"),
                       "name_known": want.get("name_known", False), "retired": want.get("retired", False)}
                ops.append((("upsert", tuple(sorted(want))), row))
                continue
            diff = {k: v for k, v in want.items() if getattr(old, k) != v}
            if diff:
                ops.append((("update", tuple(sorted(diff))), {"p_type": key[0], "p_id": key[1],
                                                              **{f"p_{c}": v for c, v in diff.items()}}))
        # one statement per shape (stable sort: keys stay in order within it), where consecutive
        # runs made one per change of shape: a poll's names, flags and new entities interleave
        for (kind, cols), rows in _runs(sorted(ops, key=lambda op: op[0])):
            if kind == "upsert":
                self.conn.execute(self.store.dialect.upsert(reg, ["type", "id"], cols), rows)
            else:
                self.conn.execute(reg.update().where((reg.c.type == sa.bindparam("p_type"))
                                                     & (reg.c.id == sa.bindparam("p_id")))
                                  .values({c: sa.bindparam(f"p_{c}") for c in cols}), rows)

    def _flush_queue(self) -> None:
        if self.fetch:
            # the database's clock, not this host's: a fetch (the ingester, maybe on another host)
            # keeps what was queued again after it read the queue by these times (remove_handled)
            fetchqueue.put(self.conn, self.store.fetch_queue, self.fetch, self.store.db_now(self.conn))
        if self.unfetch:
            fetchqueue.remove(self.conn, self.store.fetch_queue, self.unfetch)
        if self.searches:
            linksearch.put(self.conn, self.store.link_search, self.searches, self.store.db_now(self.conn))
            pending.mark(self.conn, self.store.pending, {(owner, fname) for t in {t for t, _i in self.searches}
                                                         for owner, fname, _s in linksearch.link_fields(self.store, t)})


# Statements built once per table (and columns): a proxy's learnt write runs them every time, and
# building one costs more than running it on SQLite.
@functools.lru_cache(maxsize=512)
def _rows_by_id(table: sa.Table) -> Any:
    """The rows of ``table`` whose id is in the list bound as ``ids``."""
    return sa.select(table).where(table.c.id.in_(sa.bindparam("ids", expanding=True)))


@functools.lru_cache(maxsize=512)
def _update_by_id(table: sa.Table, cols: tuple[str, ...]) -> Any:
    """Set ``cols`` (bound as ``p_<col>``) of the row whose id is bound as ``p_id``."""
    return table.update().where(table.c.id == sa.bindparam("p_id")).values({c: sa.bindparam(f"p_{c}") for c in cols})
