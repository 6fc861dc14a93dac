"""A compiled read: its SQL, and how each row of the answer decodes into SG's entity dict.

Each return field is one small object that names the columns it reads (labelled ``c<n>...``
after its position in ``return_fields``) and decodes them; multi_entity fields are filled
afterwards by one query per field for the whole page (cache/read/execute.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Passthrough
from ..replica import fieldtypes


@dataclass(frozen=True)
class NoneField:
    """A path through a multi_entity hop: SG reads it as None (deep values are documented for
    single-entity chains only)."""

    key: str

    def decode(self, row: Mapping[str, Any]) -> Any:
        return None


@dataclass(frozen=True)
class ScalarField:
    """A value stored in a column of the row (or of a linked row, for a deep path)."""

    key: str
    label: str
    data_type: str
    deep: bool  # through a link: None when the link is empty or of another type (no linked row)

    def columns(self, alias: Any, fname: str) -> list[Any]:
        cols = [alias.c[fname].label(self.label)]
        if self.deep:
            cols.append(alias.c.id.label(f"{self.label}_pid"))
        return cols

    def decode(self, row: Mapping[str, Any]) -> Any:
        if self.deep and row[f"{self.label}_pid"] is None:
            return None  # a deep path whose link is empty or of another type
        return fieldtypes.decode_scalar(self.data_type, row[self.label])


@dataclass(frozen=True)
class LinkField:
    """An entity field: the linked entity's registry row (type, id, name), None when empty or retired."""

    key: str
    label: str

    def columns(self, reg: Any) -> list[Any]:
        return [
            reg.c.type.label(f"{self.label}_type"),
            reg.c.id.label(f"{self.label}_id"),
            reg.c.name.label(f"{self.label}_name"),
            reg.c.name_known.label(f"{self.label}_known"),
        ]

    def decode(self, row: Mapping[str, Any]) -> Any:
        link_id = row[f"{self.label}_id"]
        if link_id is None:
            return None
        if not row[f"{self.label}_known"]:
            raise Passthrough("link-name-unknown", f"{row[f'{self.label}_type']} {link_id}")
        return {"type": row[f"{self.label}_type"], "id": link_id, "name": row[f"{self.label}_name"]}


#: A return field decoded from the row itself.
RowField = NoneField | ScalarField | LinkField


@dataclass(frozen=True)
class MultiField:
    """A multi_entity return field: its list comes from the field's association table."""

    key: str
    owner_type: str  # the type that holds the field
    field_name: str
    #: None: a field of the row itself (parents are the rows' ids); else, for a deep path, the
    #: label of the linked row's id (no linked row reads as None)
    parent_label: str | None


@dataclass
class Plan:
    """One read, compiled: the page's statement, the count's, and how to decode a row."""

    entity_type: str
    select: Any
    count_select: Any
    fields: list[RowField]  # in return_fields order
    multi_fields: list[MultiField]
    limit: int
    want_count: bool
    #: (type, field) of every field the read names, and (type, "*") of every type it reads
    touched: frozenset[tuple[str, str]] = frozenset()

    def decode(self, row: Any) -> dict[str, Any]:
        m = row._mapping
        out: dict[str, Any] = {"type": self.entity_type, "id": m["c_id"]}
        for returned in self.fields:
            out[returned.key] = returned.decode(m)
        return out
