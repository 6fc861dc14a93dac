"""SG's paired link fields: which field SG changes on the other side when one side is written.

A pair joins ``A.f`` and ``B.g``: setting ``A.f`` of entity *a* to link entity *b* (of type B)
makes SG add *a* to ``B.g`` of *b* (and remove it from the entity *a* linked before), and the
other way round. SG's schema_read does not say which fields are paired, so the registry has
two sources: the standard pairs shipped in ``schema/pairs.yml``, and pairs the ingester learns
from backref events (``meta.actual_attribute_changed``), kept in the ``sgcache_pairs`` table.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from sqlalchemy.engine import Connection

from ..shipped import pairs_file
from .schema import Schema

log = logging.getLogger("sgcache.pairs")

#: The pairs of SG's default schema shipped with the project.
DEFAULT_PAIRS_FILE = pairs_file()
NAME_LEN = 64

FieldRef = tuple[str, str]  # (entity type, field name)


class PairsError(ValueError):
    """A pairs file or a learned pair that cannot be used."""


def define_table(metadata: sa.MetaData) -> sa.Table:
    """``sgcache_pairs``: pairs learned from backref events (one row per direction)."""
    return sa.Table(
        "sgcache_pairs",
        metadata,
        sa.Column("entity_type", sa.String(NAME_LEN), primary_key=True),
        sa.Column("field_name", sa.String(NAME_LEN), primary_key=True),
        sa.Column("other_type", sa.String(NAME_LEN), primary_key=True),
        sa.Column("other_field", sa.String(NAME_LEN), nullable=False),
        sa.Column("event_id", sa.BigInteger),
    )


def _ref(text: Any, where: str) -> FieldRef:
    if not isinstance(text, str) or text.count(".") != 1:
        raise PairsError(f"{where}: expected 'Type.field', got {text!r}")
    entity_type, fname = text.split(".")
    if not entity_type or not fname or len(entity_type) > NAME_LEN or len(fname) > NAME_LEN:
        raise PairsError(f"{where}: expected 'Type.field', got {text!r}")
    return entity_type, fname


def load_pairs_file(path: str | Path = DEFAULT_PAIRS_FILE) -> list[tuple[FieldRef, FieldRef]]:
    """The pairs listed in a pairs file (PairsError on a bad file)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PairsError(f"cannot read pairs file {path}: {exc}") from exc
    if not isinstance(data, Mapping) or data.get("sgcache_pairs") != 1:
        raise PairsError(f"{path}: not a pairs file (missing 'sgcache_pairs: 1')")
    entries = data.get("pairs") or []
    if not isinstance(entries, list):
        raise PairsError(f"{path}: 'pairs' must be a list")
    out = []
    for n, entry in enumerate(entries):
        where = f"{path}: pair {n + 1}"
        if not isinstance(entry, list) or len(entry) != 2:
            raise PairsError(f"{where}: expected [Type.field, Type.field]")
        out.append((_ref(entry[0], where), _ref(entry[1], where)))
    return out


@dataclass
class PairRegistry:
    """Known pairs, by side: ``(A, f) -> {B: g}``."""

    reverse_of: dict[FieldRef, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def build(cls, pairs: Iterable[tuple[FieldRef, FieldRef]]) -> PairRegistry:
        reg = cls()
        for a, b in pairs:
            reg.add(a, b)
        return reg

    def add(self, a: FieldRef, b: FieldRef) -> None:
        """Record that ``a`` and ``b`` are the two sides of one pair."""
        self.reverse_of.setdefault(a, {})[b[0]] = b[1]
        self.reverse_of.setdefault(b, {})[a[0]] = a[1]

    def copy(self) -> PairRegistry:
        return PairRegistry({k: dict(v) for k, v in self.reverse_of.items()})

    def reverse(self, entity_type: str, fname: str, target_type: str) -> str | None:
        """The field of ``target_type`` paired with ``entity_type.fname``, if known."""
        return self.reverse_of.get((entity_type, fname), {}).get(target_type)

    def is_paired(self, entity_type: str, fname: str) -> bool:
        return (entity_type, fname) in self.reverse_of

    def with_learned(self, conn: Connection, table: sa.Table) -> PairRegistry:
        """This registry plus the pairs stored in ``sgcache_pairs``."""
        return self.with_rows(conn.execute(learned_pairs(table)))

    def with_rows(self, learned: Iterable[Sequence[str]]) -> PairRegistry:
        """This registry plus ``learned`` rows (entity type, field, other type, other field) of
        ``sgcache_pairs``."""
        reg = self.copy()
        for entity_type, fname, other_type, other_field in learned:
            reg.add((entity_type, fname), (other_type, other_field))
        return reg

    def reverse_fields(self, schema: Schema, entity_type: str, fname: str,
                       target_types: Iterable[str]) -> set[FieldRef]:
        """The cached fields that a write of ``entity_type.fname`` (linking ``target_types``)
        may change on the other side: the known pair on each target type, else every cached
        link field of that type that can link back to ``entity_type`` and is not known to be
        paired with another field."""
        out: set[FieldRef] = set()
        for target in target_types:
            known = self.reverse(entity_type, fname, target)
            if known is not None:
                if schema.field(target, known) is not None:
                    out.add((target, known))
                continue
            entity = schema.entities.get(target)
            if entity is None:
                continue
            for other in entity.fields.values():
                if not other.is_link or entity_type not in other.links:
                    continue
                paired_with = self.reverse(target, other.name, entity_type)
                if paired_with is None or paired_with == fname:
                    out.add((target, other.name))
        return out


def learn_from_events(conn: Connection, table: sa.Table, events: Iterable[Mapping[str, Any]]) -> int:
    """Store the pairs that backref events reveal; returns how many were new.

    A backref event is a Change on the other side (its ``entity`` and ``attribute_name``)
    whose ``meta.actual_attribute_changed`` names the field that was written (``Type.field``).
    """
    found: dict[tuple[str, str, str], tuple[str, int | None]] = {}
    for event in events:
        meta = event.get("meta")
        if not isinstance(meta, Mapping) or not meta.get("actual_attribute_changed"):
            continue
        entity = event.get("entity")
        attr = event.get("attribute_name") or meta.get("attribute_name")
        event_type = event.get("event_type")
        other_type = entity.get("type") if isinstance(entity, Mapping) else None
        if other_type is None and isinstance(event_type, str) and event_type.startswith("Shotgun_"):
            parts = event_type.split("_")
            other_type = parts[1] if len(parts) == 3 else None
        try:
            src = _ref(meta["actual_attribute_changed"], "backref event")
            dst = _ref(f"{other_type}.{attr}", "backref event")
        except PairsError:
            log.debug("backref event %s not understood", event.get("id"))
            continue
        event_id = event.get("id") if isinstance(event.get("id"), int) else None
        found[(src[0], src[1], dst[0])] = (dst[1], event_id)
        found[(dst[0], dst[1], src[0])] = (src[1], event_id)
    if not found:
        return 0
    keys = list(found)
    have = {
        (r.entity_type, r.field_name, r.other_type): r.other_field
        for r in conn.execute(sa.select(table).where(table.c.entity_type.in_({k[0] for k in keys})))
    }
    new = 0
    for key in sorted(keys):
        other_field, event_id = found[key]
        if have.get(key) == other_field:
            continue
        if key in have:
            conn.execute(table.update().where(
                (table.c.entity_type == key[0]) & (table.c.field_name == key[1]) & (table.c.other_type == key[2])
            ).values(other_field=other_field, event_id=event_id))
        else:
            conn.execute(table.insert().values(entity_type=key[0], field_name=key[1], other_type=key[2],
                                               other_field=other_field, event_id=event_id))
        new += 1
        log.info("learned pair %s.%s <-> %s.%s from event %s", key[0], key[1], key[2], other_field, event_id)
    return new


@functools.lru_cache(maxsize=8)
def learned_pairs(table: sa.Table) -> sa.Select[Any]:
    """The select of every learned pair (built once per table: it runs on every learnt write)."""
    return sa.select(table.c.entity_type, table.c.field_name, table.c.other_type, table.c.other_field)
