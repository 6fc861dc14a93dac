"""What an SG event is on the wire, and what the ingester reads of it.

An event's type is ``Shotgun_<Type>_<Action>`` (New, Change, Retirement, Revival); other
applications' events and ``DisplayColumn`` (schema) events are not entity events. The entity an
event is about, its *subject*, is ``entity`` when that names the event's type, else
``meta.entity_id``; a backref (``meta.actual_attribute_changed``: the other side of a pair)
has none of its own (read after its subject was retired, ``entity`` is null too: the subject is
then among the links of its original event, :func:`links_in_meta`). :func:`subject_of` is pure: a poll computes it once per event and passes
it on (the batch loads the rows, the links and applies the event with that one value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..replica.store import Store
from ..wire import EVENT_TYPE, Key, is_link

#: The event fields every poll reads (cached EventLogEntry fields are added).
EVENT_FIELDS = ["id", "event_type", "attribute_name", "meta", "entity", "project", "user",
                "created_at", "session_uuid"]
#: Fields of the event's entity read with the event (``entity.<Type>.<field>``): SG
#: changes them without events of their own.
DEEP_FIELDS = ("updated_at", "updated_by")
ACTIONS = ("New", "Change", "Retirement", "Revival")
SCHEMA_TYPE = "DisplayColumn"
RETIREMENT_FIELD = "retirement_date"
#: Ids per ``id in [...]`` read from SG (fetches, sweeps, field re-reads).
FETCH_CHUNK = 500


def split_event_type(event_type: Any) -> tuple[str, str] | None:
    """``Shotgun_<Type>_<Action>`` -> (Type, Action); None for other applications."""
    if not isinstance(event_type, str) or not event_type.startswith("Shotgun_"):
        return None
    entity_type, _, action = event_type[len("Shotgun_"):].rpartition("_")
    if not entity_type:
        return None
    return entity_type, action


def event_meta(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """The event's ``meta`` (an empty mapping when it has none)."""
    meta = event.get("meta")
    return meta if isinstance(meta, Mapping) else {}


def subject_of(event: Mapping[str, Any]) -> Key | None:
    """The entity an event is about: ``entity`` if it matches, else ``meta.entity_id`` (never for backrefs)."""
    parsed = split_event_type(event.get("event_type"))
    if parsed is None or parsed[1] not in ACTIONS or parsed[0] == SCHEMA_TYPE:
        return None
    entity_type = parsed[0]
    entity = event.get("entity")
    if is_link(entity) and entity["type"] == entity_type:
        return entity_type, int(entity["id"])
    meta = event_meta(event)
    if meta.get("actual_attribute_changed"):
        return None
    entity_id = meta.get("entity_id", meta.get("id"))
    if isinstance(entity_id, int) and not isinstance(entity_id, bool):
        return entity_type, entity_id
    return None


def links_in_meta(event: Mapping[str, Any], entity_type: str | None = None) -> set[Key]:
    """The entities (of ``entity_type``; None: of any type) a Change's meta links to
    (``old_value``, ``new_value``, ``added``, ``removed``): where a backref's subject is found
    from its original event."""
    meta = event_meta(event)
    out: set[Key] = set()
    for name in ("old_value", "new_value", "added", "removed"):
        value = meta.get(name)
        for link in value if isinstance(value, list) else [value]:
            if is_link(link) and (entity_type is None or link["type"] == entity_type):
                out.add((link["type"], int(link["id"])))
    return out


def event_fields(store: Store) -> list[str]:
    """The fields a poll reads: what the ingester needs, every cached EventLogEntry field, and
    ``entity.<Type>.updated_at/by`` of every cached type that has them."""
    fields = list(EVENT_FIELDS)
    if EVENT_TYPE in store.tables:
        fields += [f for f in store.cached_field_names(EVENT_TYPE) if f not in fields]
    for entity in store.schema.entities.values():
        for fname in DEEP_FIELDS:
            if fname in entity.fields:
                fields.append(f"entity.{entity.name}.{fname}")
    return fields


def deep_values(event: Mapping[str, Any], subject: Key) -> dict[str, Any]:
    """``updated_at``/``updated_by`` of the entity, read with the event (SG logs no event for them)."""
    out: dict[str, Any] = {}
    for fname in DEEP_FIELDS:
        value = event.get(f"entity.{subject[0]}.{fname}")
        if value is not None:
            out[fname] = value
    return out


def id_ranges(ids: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3,7`` for logs."""
    out: list[str] = []
    start = prev = None
    for i in sorted(ids):
        if start is None:
            start = prev = i
        elif i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(out)
