"""The cached-subset schema: which entity types and fields sgcache holds.

The on-disk form is YAML (see ``docs/schema-format.md``)::

    sgcache_schema: 1
    entities:
      Shot:
        identifier: code            # optional; the field that gives links their ``name``
        fields:
          code: text                # short form: just the SG data type
          sg_sequence: {type: entity, links: [Sequence]}
          sg_status_list: {type: status_list, values: [wtg, ip, fin]}

A field may also carry ``label``, ``description``, ``editable``, ``mandatory``,
``unique``, ``default`` and ``properties`` (any other schema_read property, kept
verbatim), so that every field of a ``schema_read`` answer can be written down.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("sgcache.schema")

FORMAT_VERSION = 1

#: SG names are plain identifiers; anything else is refused before it can reach SQL.
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")

#: The field whose value SG shows as the ``name`` of a link, where it is not ``code``.
IDENTIFIER_FIELDS = {
    "Task": "content",
    "Note": "subject",
    "Reply": "content",
    "Ticket": "title",
    "HumanUser": "name",
    "ApiUser": "firstname",
    "Project": "name",
    "Group": "code",
    "Department": "name",
    "Page": "name",
    "Attachment": "filename",
    "EventLogEntry": "description",
    "TimeLog": "description",
}

#: Keys of a field entry other than its type, in the order they are written.
_FIELD_KEYS = ("label", "description", "editable", "mandatory", "unique", "default", "properties")


def reader_dependent(fname: str) -> bool:
    """A field whose value SG computes for the user who reads it (``Version.viewed_by_current_user``,
    ``Project.current_user_favorite``, ``Page.current_user_can_see``, ...): one stored value is not
    every reader's, so it is never cached (a read naming it passes, ``uncached-field``)."""
    return "current_user" in fname


class SchemaError(ValueError):
    """A schema file or rules file that cannot be used."""


@dataclass(frozen=True)
class FieldSchema:
    """One field of an entity type, as SG describes it."""

    entity_type: str
    name: str
    data_type: str
    links: tuple[str, ...] = ()
    values: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_link(self) -> bool:
        return self.data_type in ("entity", "multi_entity", "addressing")

    def to_yaml(self) -> str | dict[str, Any]:
        """The YAML value for this field: the bare type when nothing else is known."""
        out: dict[str, Any] = {"type": self.data_type}
        if self.links:
            out["links"] = list(self.links)
        if self.values is not None:
            out["values"] = list(self.values)
        for key in _FIELD_KEYS:
            if key in self.extra:
                out[key] = self.extra[key]
        return self.data_type if len(out) == 1 else out


@dataclass
class EntitySchema:
    """One entity type and the fields of it that are cached."""

    name: str
    fields: dict[str, FieldSchema]
    label: str | None = None
    identifier: str | None = None

    @property
    def name_field(self) -> str | None:
        """The field that gives this type's links their ``name``."""
        if self.identifier:
            return self.identifier
        preferred = IDENTIFIER_FIELDS.get(self.name)
        for candidate in (preferred, "code", "name"):
            if candidate and candidate in self.fields:
                return candidate
        return preferred


def default_identifier(entity_type: str) -> str:
    """SG's display-name field for a type that is not in the cached schema."""
    return IDENTIFIER_FIELDS.get(entity_type, "code")


class Schema:
    """A set of entity types and their fields."""

    def __init__(self, entities: Mapping[str, EntitySchema]):
        self.entities: dict[str, EntitySchema] = dict(entities)
        for entity in self.entities.values():
            _check_name(entity.name, "entity type")
            for fname in entity.fields:
                _check_name(fname, f"field of {entity.name}")

    def __contains__(self, entity_type: object) -> bool:
        return entity_type in self.entities

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self.to_dict() == other.to_dict()

    def field(self, entity_type: str, name: str) -> FieldSchema | None:
        """The schema of ``entity_type.name``, or None when it is not cached."""
        entity = self.entities.get(entity_type)
        return entity.fields.get(name) if entity else None

    def identifier(self, entity_type: str) -> str | None:
        entity = self.entities.get(entity_type)
        return entity.name_field if entity else default_identifier(entity_type)

    # -- YAML -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schema:
        """Build a schema from the parsed YAML document."""
        if not isinstance(data, Mapping) or not isinstance(data.get("entities"), Mapping):
            raise SchemaError("a schema file needs a top-level 'entities' mapping")
        version = data.get("sgcache_schema", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SchemaError(f"unsupported schema format version {version!r}")
        entities: dict[str, EntitySchema] = {}
        for type_name, body in data["entities"].items():
            body = body or {}
            if not isinstance(body, Mapping):
                raise SchemaError(f"{type_name}: expected a mapping")
            fields: dict[str, FieldSchema] = {}
            for fname, spec in (body.get("fields") or {}).items():
                fields[fname] = _field_from_yaml(type_name, fname, spec)
            if "id" not in fields:
                fields["id"] = FieldSchema(type_name, "id", "number")
            entities[type_name] = EntitySchema(
                type_name, fields, label=body.get("label"), identifier=body.get("identifier")
            )
        return cls(entities)

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read a schema YAML file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SchemaError(f"cannot read schema file {path}: {exc}") from exc
        return cls.from_yaml(text)

    @classmethod
    def from_yaml(cls, text: str) -> Schema:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SchemaError(f"schema is not valid YAML: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        entities: dict[str, Any] = {}
        for type_name in sorted(self.entities):
            entity = self.entities[type_name]
            body: dict[str, Any] = {}
            if entity.label:
                body["label"] = entity.label
            if entity.identifier:
                body["identifier"] = entity.identifier
            body["fields"] = {f: entity.fields[f].to_yaml() for f in sorted(entity.fields)}
            entities[type_name] = body
        return {"sgcache_schema": FORMAT_VERSION, "entities": entities}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)

    def brief(self) -> Schema:
        """The same types and fields with only what the cache uses (type, links, values)."""
        return Schema(
            {
                t: EntitySchema(
                    t,
                    {f: FieldSchema(t, f, s.data_type, s.links, s.values) for f, s in e.fields.items()},
                    label=e.label,
                    identifier=e.identifier,
                )
                for t, e in self.entities.items()
            }
        )

    def cacheable(self) -> Schema:
        """This schema without the fields whose value depends on who reads it (:func:`reader_dependent`):
        what a replica may hold (a schema file written before that rule may name some)."""
        dropped = [f"{t}.{f}" for t, e in self.entities.items() for f in e.fields if reader_dependent(f)]
        if not dropped:
            return self
        log.warning("not cached, their values depend on who reads them: %s", ", ".join(sorted(dropped)))
        return Schema({t: EntitySchema(t, {f: s for f, s in e.fields.items() if not reader_dependent(f)},
                                       label=e.label, identifier=e.identifier)
                       for t, e in self.entities.items()})

    # -- from a live site ------------------------------------------------------------
    @classmethod
    def from_schema_read(
        cls, schema_read: Mapping[str, Any], entity_read: Mapping[str, Any] | None = None
    ) -> Schema:
        """Convert SG's ``schema_read`` (and ``schema_entity_read``) answers."""
        entities: dict[str, EntitySchema] = {}
        for type_name, fields_in in schema_read.items():
            fields = {
                fname: _field_from_schema_read(type_name, fname, fspec)
                for fname, fspec in fields_in.items()
            }
            label = None
            if entity_read and type_name in entity_read:
                label = _value(entity_read[type_name].get("name"))
            entities[type_name] = EntitySchema(type_name, fields, label=label)
        return cls(entities)

    # -- subsets ---------------------------------------------------------------------
    def filtered(self, rules: Iterable[tuple[bool, str]]) -> Schema:
        """Keep the fields that the include/exclude rules select; later rules win.

        A type is kept when any of its fields is; a kept type always keeps ``id``.
        """
        rules = list(rules)
        entities: dict[str, EntitySchema] = {}
        for type_name, entity in self.entities.items():
            kept: dict[str, FieldSchema] = {}
            for fname, fschema in entity.fields.items():
                if reader_dependent(fname):
                    continue
                selected = False
                for include, pattern in rules:
                    if fnmatch.fnmatchcase(f"{type_name}.{fname}", pattern):
                        selected = include
                if selected:
                    kept[fname] = fschema
            if kept:
                kept.setdefault("id", entity.fields.get("id") or FieldSchema(type_name, "id", "number"))
                entities[type_name] = EntitySchema(
                    type_name, kept, label=entity.label, identifier=entity.identifier
                )
        return Schema(entities)


def parse_rules(text: str) -> list[tuple[bool, str]]:
    """Parse a rules file: ``+Type.field`` or ``-Type.field`` globs, ``#`` comments.

    ``+Type`` alone means ``+Type.*``.
    """
    rules: list[tuple[bool, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        sign, pattern = line[0], line[1:].strip()
        if sign not in "+-" or not pattern:
            raise SchemaError(f"rules line {lineno}: expected '+Type.field' or '-Type.field', got {raw!r}")
        if "." not in pattern:
            pattern += ".*"
        rules.append((sign == "+", pattern))
    return rules


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SchemaError(f"invalid {what} name {name!r}")


def _value(entry: Any) -> Any:
    """schema_read wraps every property as ``{"value": ..., "editable": ...}``."""
    if isinstance(entry, Mapping) and "value" in entry:
        return entry["value"]
    return entry


def _field_from_yaml(type_name: str, fname: str, spec: Any) -> FieldSchema:
    if isinstance(spec, str):
        return FieldSchema(type_name, fname, spec)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise SchemaError(f"{type_name}.{fname}: expected a data type or a mapping with 'type'")
    links = tuple(spec.get("links") or ())
    values = spec.get("values")
    extra = {k: spec[k] for k in _FIELD_KEYS if k in spec}
    return FieldSchema(
        type_name,
        fname,
        spec["type"],
        links=links,
        values=tuple(values) if values is not None else None,
        extra=extra,
    )


def _field_from_schema_read(type_name: str, fname: str, fspec: Mapping[str, Any]) -> FieldSchema:
    props = dict(fspec.get("properties") or {})
    links = tuple(_value(props.pop("valid_types", None)) or ())
    values = _value(props.pop("valid_values", None))
    extra: dict[str, Any] = {}
    for yaml_key, sg_key in (
        ("label", "name"),
        ("description", "description"),
        ("editable", "editable"),
        ("mandatory", "mandatory"),
        ("unique", "unique"),
    ):
        if sg_key in fspec:
            value = _value(fspec[sg_key])
            if value not in (None, ""):
                extra[yaml_key] = value
    if "default_value" in props:
        default = _value(props.pop("default_value"))
        if default is not None:
            extra["default"] = default
    rest = {k: _value(v) for k, v in props.items()}
    if rest:
        extra["properties"] = rest
    return FieldSchema(
        type_name,
        fname,
        _value(fspec.get("data_type")),
        links=links,
        values=tuple(values) if values is not None else None,
        extra=extra,
    )


def select_types(schema: Schema, types: str | None) -> list[str]:
    """The types named by a ``--types`` list (``Shot,Task``; all cached types when empty); a name the
    schema does not cache raises SchemaError naming it and the schema's types."""
    if not types:
        return sorted(schema.entities)
    names = [t.strip() for t in types.split(",") if t.strip()]
    unknown = [t for t in names if t not in schema]
    if unknown:
        raise SchemaError(f"not cached types: {', '.join(unknown)} (the schema's types: "
                          f"{', '.join(sorted(schema.entities))})")
    return names
