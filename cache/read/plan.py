"""A compiled read: its SQL, and how each row of the answer decodes into SG's entity dict.

Each return field is one small object that names the columns it reads (labelled ``c<n>...``
after its position in ``return_fields``) and decodes them; multi_entity fields are filled
afterwards by one query per field for the whole page (cache/read/execute.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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

    def compiled(self, index: Mapping[str, int]) -> Callable[[Any], Any]:
        return _none


def _none(row: Any) -> None:
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

    def compiled(self, index: Mapping[str, int]) -> Callable[[Any], Any]:
        """:meth:`decode` for a row as a tuple whose columns are at ``index``."""
        at = index[self.label]
        convert = fieldtypes.scalar_decoder(self.data_type)
        if self.deep:
            pid = index[f"{self.label}_pid"]
            if convert is None:
                return lambda row: None if row[pid] is None else row[at]
            return lambda row: None if row[pid] is None else convert(row[at])
        if convert is None:
            return lambda row: row[at]
        return lambda row: convert(row[at])


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

    def compiled(self, index: Mapping[str, int]) -> Callable[[Any], Any]:
        """:meth:`decode` for a row as a tuple whose columns are at ``index``."""
        t, i, n, k = (index[f"{self.label}_{part}"] for part in ("type", "id", "name", "known"))

        def decode(row: Any) -> Any:
            link_id = row[i]
            if link_id is None:
                return None
            if not row[k]:
                raise Passthrough("link-name-unknown", f"{row[t]} {link_id}")
            return {"type": row[t], "id": link_id, "name": row[n]}
        return decode


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
    #: the filter relations it uses (the rules the audit names, docs/semantics.md)
    relations: frozenset[str] = frozenset()
    #: built for one instant (relative dates): never reused from the plan cache
    timed: bool = False
    #: run without parallel workers (PostgreSQL): a page walked in index order with an EXISTS
    #: probe per row was planned as a parallel walk whose workers took longer to start than the
    #: walk itself (docs/scale.md)
    serial: bool = False
    #: ``include_archived_projects: false`` on a type with a ``project``: passes while the replica
    #: holds a retired archived Project (cache/read/execute.py)
    archived_guard: bool = False

    #: The row decoder for the columns it was built for (built at the first row: plans are cached).
    _decoder: tuple[tuple[str, ...], Callable[[Any], dict[str, Any]]] | None = field(
        default=None, repr=False, compare=False)

    def decode(self, row: Any) -> dict[str, Any]:
        """A row of :attr:`select` as SG's entity dict."""
        return self.decoder(tuple(row._fields))(row)

    def decoder(self, columns: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
        """:meth:`decode` for rows with these ``columns`` (a result's keys), built once per plan."""
        built = self._decoder
        if built is None or built[0] != columns:
            built = self._decoder = (columns, self._build_decoder(columns))
        return built[1]

    def _build_decoder(self, columns: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
        """Decoding by column position: no per-row lookup of labels or data types."""
        index = {name: i for i, name in enumerate(columns)}
        entity_type, id_at = self.entity_type, index["c_id"]
        parts = [(returned.key, returned.compiled(index)) for returned in self.fields]

        def decode(row: Any) -> dict[str, Any]:
            out: dict[str, Any] = {"type": entity_type, "id": row[id_at]}
            for key, part in parts:
                out[key] = part(row)
            return out
        return decode
