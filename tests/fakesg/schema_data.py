"""Helpers that build SG schemas in ``schema_read`` format for the fake site.

The shape produced is the one ``Shotgun.schema_read()`` returns::

    {Type: {field: {"data_type": {"editable": False, "value": "text"},
                    "properties": {"default_value": {...}, "valid_types": {...}, ...},
                    "editable": {...}, "entity_type": {...}, "name": {...}, ...}}}

and ``schema_entity_read()``: ``{Type: {"name": {"editable": False, "value": "Shot"}, "visible": ...}}``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Repo root is two levels up from this file (tests/fakesg/schema_data.py).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The shared fixtures live next to the repo, never inside it.
FIXTURE_DIR = REPO_ROOT.parent / "shared" / "fixtures"
FIXTURE_SCHEMA = "shotgun-schema-read.json"
FIXTURE_ENTITY_SCHEMA = "shotgun-schema-entity-read.json"

#: Types that carry no ``project`` field in SG.
NON_PROJECT_TYPES = frozenset(
    {"Project", "HumanUser", "ApiUser", "Group", "Department", "Step", "PublishedFileType",
     "TaskTemplate", "LocalStorage", "PermissionRuleSet", "Status", "Icon"}
)

#: Field spec accepted by :func:`make_schema`: a data type, or ``(data_type, list)`` where the list holds
#: valid_types for entity / multi_entity fields and valid_values for list / status_list fields.
FieldSpec = str | tuple[str, list[str]]

def _prop(value: Any, editable: bool = False) -> dict[str, Any]:
    return {"editable": editable, "value": value}


def humanize(field_name: str) -> str:
    """``sg_cut_in`` -> ``Cut In`` (the display name SG would show)."""
    name = re.sub(r"^sg_", "", field_name)
    return " ".join(part.capitalize() for part in name.split("_") if part) or field_name


def field_schema(
    entity_type: str,
    field_name: str,
    data_type: str,
    *,
    valid_types: list[str] | None = None,
    valid_values: list[str] | None = None,
    default_value: Any = None,
    editable: bool = True,
    display_name: str | None = None,
) -> dict[str, Any]:
    """Build one field's schema_read entry."""
    properties: dict[str, Any] = {
        "default_value": _prop(default_value),
        "summary_default": _prop("none", True),
    }
    if data_type in ("entity", "multi_entity"):
        properties["valid_types"] = _prop(list(valid_types or []), True)
    if data_type in ("list", "status_list"):
        properties["valid_values"] = _prop(list(valid_values or []), True)
        if data_type == "status_list" and default_value is None and valid_values:
            properties["default_value"] = _prop(valid_values[0], True)
    return {
        "data_type": _prop(data_type),
        "description": _prop("", True),
        "editable": _prop(editable),
        "entity_type": _prop(entity_type),
        "mandatory": _prop(False),
        "name": _prop(display_name or humanize(field_name), True),
        "properties": properties,
        "unique": _prop(False),
        "visible": _prop(True),
    }


def _standard_fields(entity_type: str, with_project: bool) -> dict[str, dict[str, Any]]:
    fields = {"id": field_schema(entity_type, "id", "number", editable=False, display_name="Id")}
    fields["created_at"] = field_schema(entity_type, "created_at", "date_time", editable=False,
                                        display_name="Date Created")
    if entity_type != "EventLogEntry":
        fields["updated_at"] = field_schema(entity_type, "updated_at", "date_time", editable=False,
                                            display_name="Date Updated")
        for f in ("created_by", "updated_by"):
            fields[f] = field_schema(entity_type, f, "entity", valid_types=["HumanUser", "ApiUser"],
                                     editable=False)
    if with_project:
        fields["project"] = field_schema(entity_type, "project", "entity", valid_types=["Project"])
    return fields


def make_schema(
    spec: dict[str, dict[str, FieldSpec]],
    non_project_types: frozenset[str] | set[str] = NON_PROJECT_TYPES,
) -> dict[str, dict[str, Any]]:
    """Build a schema_read-format dict from ``{Type: {field: data_type | (data_type, [list])}}``.

    Every type gets id, created_at, updated_at, created_by, updated_by (EventLogEntry only id and
    created_at), and ``project`` unless listed in ``non_project_types``. Explicit fields override those.
    """
    schema: dict[str, dict[str, Any]] = {}
    for entity_type, fields in spec.items():
        out = _standard_fields(entity_type, entity_type not in non_project_types)
        for field_name, fspec in fields.items():
            if isinstance(fspec, tuple):
                data_type, extra = fspec
            else:
                data_type, extra = fspec, None
            kwargs: dict[str, Any] = {}
            if data_type in ("entity", "multi_entity"):
                kwargs["valid_types"] = extra or []
            elif data_type in ("list", "status_list"):
                kwargs["valid_values"] = extra or []
            out[field_name] = field_schema(entity_type, field_name, data_type, **kwargs)
        schema[entity_type] = out
    return schema


def make_entity_schema(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """schema_entity_read-format dict for the types of ``schema`` (display name = type name)."""
    return {t: {"name": _prop(t), "visible": _prop(True)} for t in schema}


def load_fixture_schema() -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Return ``(schema_read, schema_entity_read)`` of the real SG site fixture, or None if absent."""
    schema_path = FIXTURE_DIR / FIXTURE_SCHEMA
    entity_path = FIXTURE_DIR / FIXTURE_ENTITY_SCHEMA
    if not schema_path.exists() or not entity_path.exists():
        log.info("fixture schema not found under %s", FIXTURE_DIR)
        return None
    with schema_path.open(encoding="utf-8") as fh:
        schema = json.load(fh)
    with entity_path.open(encoding="utf-8") as fh:
        entity_schema = json.load(fh)
    return schema, entity_schema


STATUSES = ["wtg", "rdy", "ip", "rev", "fin", "hld", "omt"]

#: Every type a link to the event log can point at in the basic schema.
_BASIC_TYPES = [
    "Project", "Sequence", "Shot", "Asset", "Step", "Task", "Version", "PublishedFile",
    "PublishedFileType", "HumanUser", "ApiUser", "Group", "Note", "Playlist", "TaskTemplate",
]


def basic_spec() -> dict[str, dict[str, FieldSpec]]:
    """The compact spec behind :func:`basic_schema` (a fresh dict; callers may extend it)."""
    return {
        "Project": {
            "name": "text", "sg_description": "text", "archived": "checkbox",
            "sg_status": ("list", ["Active", "Bidding", "Lost"]),
            "users": ("multi_entity", ["HumanUser"]), "image": "image",
        },
        "Sequence": {
            "code": "text", "description": "text", "sg_status_list": ("status_list", STATUSES),
            "shots": ("multi_entity", ["Shot"]), "image": "image",
            "tasks": ("multi_entity", ["Task"]), "notes": ("multi_entity", ["Note"]),
        },
        "Shot": {
            "code": "text", "description": "text", "sg_status_list": ("status_list", STATUSES),
            "sg_sequence": ("entity", ["Sequence"]), "assets": ("multi_entity", ["Asset"]),
            "tasks": ("multi_entity", ["Task"]), "sg_cut_in": "number", "sg_cut_out": "number",
            "sg_cut_duration": "duration", "sg_frame_rate": "float", "sg_completion": "percent",
            "sg_timecode": "timecode", "sg_budget": "currency", "sg_omit": "checkbox",
            "sg_due_date": "date", "sg_last_review": "date_time",
            "sg_shot_type": ("list", ["Hero", "Background", "FX"]), "sg_color": "color",
            "sg_uuid": "uuid", "tags": "tag_list", "sg_data": "serializable", "sg_link": "url",
            "sg_footage": "footage", "image": "image", "sg_entity_type": "entity_type",
            "task_template": ("entity", ["TaskTemplate"]), "sg_related": ("entity", ["Asset", "Sequence"]),
            "notes": ("multi_entity", ["Note"]),
        },
        "Asset": {
            "code": "text", "description": "text", "sg_status_list": ("status_list", STATUSES),
            "sg_asset_type": ("list", ["Character", "Prop", "Environment"]),
            "shots": ("multi_entity", ["Shot"]), "tasks": ("multi_entity", ["Task"]),
            "parents": ("multi_entity", ["Asset"]), "image": "image", "tags": "tag_list",
            "assets": ("multi_entity", ["Asset"]), "notes": ("multi_entity", ["Note"]),
            "task_template": ("entity", ["TaskTemplate"]),
        },
        "Step": {"code": "text", "short_name": "text", "color": "color", "entity_type": "entity_type"},
        "Task": {
            "content": "text", "entity": ("entity", ["Shot", "Asset", "Sequence"]),
            "step": ("entity", ["Step"]), "sg_status_list": ("status_list", STATUSES),
            "task_assignees": ("multi_entity", ["HumanUser", "Group"]), "start_date": "date",
            "due_date": "date", "duration": "duration", "color": "color",
            "sg_priority": ("list", ["1", "2", "3"]), "notes": ("multi_entity", ["Note"]),
        },
        "Version": {
            "code": "text", "description": "text", "entity": ("entity", ["Shot", "Asset"]),
            "sg_task": ("entity", ["Task"]), "sg_status_list": ("status_list", STATUSES),
            "user": ("entity", ["HumanUser", "ApiUser"]), "sg_path_to_movie": "text",
            "sg_uploaded_movie": "url", "sg_first_frame": "number", "image": "image",
            "playlists": ("multi_entity", ["Playlist"]), "published_files": ("multi_entity", ["PublishedFile"]),
            "notes": ("multi_entity", ["Note"]),
        },
        "PublishedFile": {
            "code": "text", "name": "text", "description": "text", "entity": ("entity", ["Shot", "Asset"]),
            "task": ("entity", ["Task"]), "published_file_type": ("entity", ["PublishedFileType"]),
            "path": "url", "version_number": "number", "version": ("entity", ["Version"]),
        },
        "PublishedFileType": {"code": "text", "description": "text"},
        "HumanUser": {
            "name": "text", "firstname": "text", "lastname": "text", "login": "text", "email": "text",
            "sg_status_list": ("status_list", ["act", "dis"]), "groups": ("multi_entity", ["Group"]),
            "image": "image",
        },
        "ApiUser": {"firstname": "text", "lastname": "text", "description": "text",
                    "generate_event_log_entries": "checkbox"},
        "Group": {"code": "text", "users": ("multi_entity", ["HumanUser"])},
        "Note": {
            "subject": "text", "content": "text", "user": ("entity", ["HumanUser", "ApiUser"]),
            "note_links": ("multi_entity", ["Shot", "Asset", "Version", "Sequence"]),
            "tasks": ("multi_entity", ["Task"]), "addressings_to": ("multi_entity", ["HumanUser", "Group"]),
            "sg_status_list": ("status_list", ["opn", "clsd"]),
        },
        "Playlist": {
            "code": "text", "description": "text", "versions": ("multi_entity", ["Version"]),
            "locked": "checkbox", "sg_date_and_time": "date_time",
        },
        "TaskTemplate": {"code": "text", "description": "text"},
        "EventLogEntry": {
            "event_type": "text", "attribute_name": "text", "meta": "serializable",
            "entity": ("entity", list(_BASIC_TYPES)), "user": ("entity", ["HumanUser", "ApiUser"]),
            "session_uuid": "uuid", "description": "text", "cached_display_name": "text",
        },
    }


def basic_schema() -> dict[str, Any]:
    """A small studio schema (schema_read format) covering every cacheable data type."""
    return make_schema(basic_spec())
