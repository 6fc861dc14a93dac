"""Applying one event to the replica, through a :class:`~cache.replica.writes.WriteBatch`.

Invariants kept here (see :mod:`cache.ingest`):

- Never lose an update: an entity whose values cannot be taken from the event (New, Revival,
  a row never seen, a value in doubt, an event that filled a gap late; for a backref read after
  its subject was retired, the entities its original event links to) is queued for a fetch
  (``sgcache_fetch``) in the poll's transaction, never skipped.
- The old-value guard: a Change whose ``old_value`` and ``new_value`` both differ from the
  row's value is not applied but fetched: the row holds a later write (the proxy learned it
  before this event was polled) or missed one, and an older value must not overwrite a newer one.
- After a proxy's write: a proxy stores SG's answer at once, before the ingester has the
  events that came before that write. An event on a row a proxy wrote since the ingester last
  caught up (``unsettled``, set by the batch), or one linking to such a row, may be older than
  the row: it is applied only where it changes nothing (the write's own events), else the row is
  fetched. So a value set back (A -> B by someone, B -> A through the proxy) is never undone by
  the older event, which the old-value guard cannot tell from a newer one.
- Idempotence: applying an event twice changes nothing (upserts, set semantics for links).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..replica import fieldtypes
from ..replica.effects import REFETCHED
from ..replica.store import Store
from ..replica.writes import WriteBatch
from ..wire import Key, is_link
from .eventwire import (
    ACTIONS,
    RETIREMENT_FIELD,
    SCHEMA_TYPE,
    deep_values,
    event_meta,
    links_in_meta,
    split_event_type,
    subject_of,
)
from .schemarefresh import SchemaRefresh

log = logging.getLogger("sgcache.events")

#: The queue's reasons for an entity whose retired flag comes with its fetch (the event not applied).
LATE_RETIREMENT = "late retirement/revival"
RETIREMENT_AFTER_PROXY = "retirement/revival after a proxy's write"


class EventApplier:
    """Turns events into writes of a batch: registry, retirements, field changes, link changes, fetches."""

    def __init__(self, store: Store, schema_refresh: SchemaRefresh):
        self.store = store
        self.schema_refresh = schema_refresh
        self._skipped_types: set[str] = set()
        #: The events of the batch being applied, by id (set by the batch; not stored yet).
        self.recent: Mapping[int, Mapping[str, Any]] = {}
        #: The rows a proxy wrote that the ingester has not caught up past (set by the batch).
        self.unsettled: Collection[Key] = ()
        #: Entities revived by the events applied since :meth:`queue_linking` last ran.
        self.revived: set[Key] = set()

    def apply_event(self, conn: Connection, event: Mapping[str, Any], late: bool = False,
                    buf: WriteBatch | None = None) -> None:
        """Apply one event inside the caller's transaction; applying it twice changes nothing.

        With ``buf`` (a batch) some writes wait in it until it is flushed.
        """
        self.apply(conn, event, subject_of(event), late, buf)

    def apply(self, conn: Connection, event: Mapping[str, Any], subject: Key | None, late: bool,
              buf: WriteBatch | None = None) -> None:
        """:meth:`apply_event` with the event's subject already known (:func:`subject_of`)."""
        own = buf is None
        buf = buf or WriteBatch(self.store, conn)
        self._dispatch(conn, event, subject, late, buf)
        if own:
            self.queue_linking(buf)
            buf.flush()

    def queue_linking(self, buf: WriteBatch) -> None:
        """Queue for a re-read the rows linking the entities revived since the last call (see
        :meth:`_retire`), and a search of SG for those the replica does not know link them
        (cache/replica/linksearch.py); the caller flushes ``buf``."""
        if self.revived:
            revived, self.revived = self.revived, set()
            buf.read_around_revivals(revived)

    def _dispatch(self, conn: Connection, event: Mapping[str, Any], subject: Key | None, late: bool,
                  buf: WriteBatch) -> None:
        parsed = split_event_type(event.get("event_type"))
        if parsed is None or parsed[1] not in ACTIONS:
            return
        entity_type, action = parsed
        if entity_type == SCHEMA_TYPE:
            self.schema_refresh.note_event(conn, event)
            return
        if subject is None:
            if action == "Change" and event_meta(event).get("actual_attribute_changed"):
                self._backref_without_subject(conn, event, entity_type, buf)
            else:
                log.debug("event %s names no entity; skipped", event.get("id"))
            return
        entity = event.get("entity")
        if is_link(entity) and entity["type"] == entity_type:
            buf.note([entity])
        cached = entity_type in self.store.tables
        if not cached and entity_type not in self._skipped_types:
            self._skipped_types.add(entity_type)
            log.info("events of uncached type %s: only the registry is kept", entity_type)
        event_id = int(event["id"])
        if action == "New":
            if cached:
                buf.queue(subject, "new")
        elif action in ("Retirement", "Revival"):
            self._retire(buf, subject, action == "Retirement", event_id, late, event)
        else:
            self._change(buf, event, subject, event_id, late)

    def _backref_without_subject(self, conn: Connection, event: Mapping[str, Any], entity_type: str,
                                 buf: WriteBatch) -> None:
        """A backref read after its subject was retired: ``entity`` is null and the meta's id names
        the trigger (docs/notes/events.md, pitfall 3). The subject is one of the entities of its
        type that the original event links to: all of them are fetched (retired ones too), so
        the retired subject's side of the pair is not left stale."""
        if entity_type not in self.store.tables:
            return
        original = self._original(conn, event_meta(event).get("original_event_log_entry_id"))
        candidates = links_in_meta(original, entity_type) if original is not None else set()
        if not candidates:
            log.warning("event %s: backref of a retired %s whose original event is not known; skipped",
                        event.get("id"), entity_type)
            return
        for key in sorted(candidates):
            buf.queue(key, "backref of a retired entity")

    def _original(self, conn: Connection, event_id: Any) -> Mapping[str, Any] | None:
        """The event ``event_id``: in the batch being applied, else as kept in ``sgcache_events``."""
        if not isinstance(event_id, int) or isinstance(event_id, bool):
            return None
        if event_id in self.recent:
            return self.recent[event_id]
        table = self.store.events
        body = conn.execute(sa.select(table.c.body).where(table.c.id == event_id)).scalar()
        return json.loads(body) if body is not None else None

    def _after_a_proxy_write(self, event: Mapping[str, Any], subject: Key) -> bool:
        """Whether the event's row, or a row its meta links to (the other side of a pair), was
        written by a proxy since the ingester last caught up: the event may be older than it."""
        unsettled = self.unsettled
        return bool(unsettled) and (subject in unsettled or any(k in unsettled for k in links_in_meta(event)))

    def _retire(self, buf: WriteBatch, subject: Key, retired: bool, event_id: int, late: bool,
                event: Mapping[str, Any] | None = None) -> None:
        cached = subject[0] in self.store.tables
        if cached and not retired:
            # SG shows a revived entity again in the other side of every pair it is linked
            # through, with no event for that side; a fetch of the other side while this one was
            # retired (in SG, not yet here) may have dropped the link: read those rows again,
            # whichever way the revival itself is taken (applied, or its row read again)
            for other in buf.linked_from(subject):
                buf.queue(other, "linked to a revived entity")
        if not retired:
            # and the rows linking it (of an uncached type too: the registry knew it retired),
            # whose links to it a re-read kept hidden (WriteBatch.put, replace_links): SG shows
            # them again, or removed one meanwhile (found for the whole batch at once: queue_linking)
            self.revived.add(subject)
        if cached and late:
            buf.queue(subject, LATE_RETIREMENT)
            return
        if (cached and event is not None and self._after_a_proxy_write(event, subject)
                and buf.is_retired(subject) not in (None, retired)):
            buf.queue(subject, RETIREMENT_AFTER_PROXY)
            return
        buf.retire(subject, retired, event_id)
        if cached and (not retired or not buf.exists(subject)):
            buf.queue(subject, "revival" if not retired else "unknown row")

    def _change(self, buf: WriteBatch, event: Mapping[str, Any], subject: Key, event_id: int, late: bool) -> None:
        meta = event_meta(event)
        attr = event.get("attribute_name") or meta.get("attribute_name")
        if attr == RETIREMENT_FIELD and "new_value" in meta:
            self._retire(buf, subject, meta["new_value"] is not None, event_id, late, event)
            return
        if subject[0] not in self.store.tables:
            return
        fschema = self.store.schema.field(subject[0], attr) if isinstance(attr, str) else None
        if fschema is None or attr == "id" or not fieldtypes.is_cached_type(fschema.data_type):
            return
        backref = bool(meta.get("actual_attribute_changed"))
        exists = buf.exists(subject)
        if meta.get("in_create") and not backref and exists:
            return  # the New's fetch already read this value
        if late or not exists:
            buf.queue(subject, "late event" if late else "unknown row")
            return
        if (subject[0], attr) in REFETCHED:  # SG computes other fields of the row from this one
            buf.queue(subject, "computed fields")
        if not backref and meta.get("field_data_type") not in (None, fschema.data_type):
            buf.queue(subject, "field type differs")
            return
        storage = fieldtypes.TYPES[fschema.data_type].storage
        record = deep_values(event, subject)
        proxied = self._after_a_proxy_write(event, subject)
        if storage == "multi" and ("added" in meta or "removed" in meta):
            if not self._change_multi(buf, subject, attr, meta, event_id, proxied):
                return
        elif "new_value" in meta and storage != "multi":
            if proxied and not buf.holds(subject, attr, meta["new_value"]):
                # a proxy wrote this row (or the row it links to) since the ingester caught up:
                # the event may be older than the row, and the old-value guard cannot tell
                buf.queue(subject, "changed after a proxy's write")
                return
            if (not backref and "old_value" in meta and not buf.holds(subject, attr, meta["new_value"])
                    and not buf.holds(subject, attr, meta["old_value"])):
                # the row is neither before nor after this event: a later write (the proxy learned
                # it) or a missed one; an older value must not overwrite it: read SG's row instead
                buf.queue(subject, "replica not at the event's old value")
                return
            record[attr] = meta["new_value"]
        else:
            buf.queue(subject, "change without usable value")
            return
        if not buf.write(subject, record, event_id):
            buf.queue(subject, "value not applicable")

    def _change_multi(self, buf: WriteBatch, subject: Key, attr: str, meta: Mapping[str, Any],
                      event_id: int, proxied: bool = False) -> bool:
        """Apply an ``added``/``removed`` change; False when the row is fetched instead."""
        added, removed = meta.get("added") or [], meta.get("removed") or []
        if not isinstance(added, list) or not isinstance(removed, list) or not all(
                is_link(x) for x in [*added, *removed]):
            buf.queue(subject, "bad multi_entity change")
            return True
        if proxied and buf.links_would_change(subject, attr, added, removed):
            buf.queue(subject, "changed after a proxy's write")
            return False
        if (not meta.get("actual_attribute_changed") and not proxied and (added or not removed)
                and buf.keeps_links(subject, attr, added, removed)):
            # a ``set`` may put the links it adds before those it keeps, or only reorder the list
            # (nothing added or removed): the event does not say SG's order, an ``add`` appends
            # (after a proxy's write the list is SG's answer to it, newer than the event)
            buf.queue(subject, "multi_entity order")
        buf.change_links(subject, attr, added, removed, event_id)
        return True
