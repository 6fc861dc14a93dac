"""FakeSite: an in-memory Shotgun/ShotGrid site speaking the API3 JSON methods.

It is the *independent* oracle the SQL cache is compared against, so it is written from SG's documented
behaviour (see shared/notes/api3-protocol.md and events.md), not from mockgun.

Choices where SG's behaviour is not documented are module constants or are stated in docstrings:

* NULL placement in sorts: :data:`NULLS_SORT_SMALLEST`.
* Text matching: only ``text`` fields compare case-insensitively (list / status_list are exact).
* Deep filter paths through a multi_entity hop have EXISTS semantics: no linked entity, no match.
* Deep *return* / sort paths through a multi_entity hop read as None (SG documents single-entity chains only).
* Error codes: :data:`ERR_AUTH`, :data:`ERR_BAD_REQUEST`, :data:`ERR_NOT_FOUND`, :data:`ERR_NO_METHOD`.
"""

from __future__ import annotations

import calendar
import copy
import json
import logging
import re
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .files import FakeFiles
from .relative import relative_predicate
from .schema_data import basic_schema, field_schema, make_entity_schema

log = logging.getLogger(__name__)

#: NULL placement in sorts. True: NULL is the smallest value, so NULLs come first ascending and last
#: descending. PostgreSQL (SG's database) defaults to the opposite (NULL largest), but no source shows what
#: SG's ORM emits, while mockgun's tests (test_ordered_filter_operator) and SQLite's default agree on
#: "smallest". One rule, used everywhere; the cache must implement the same with explicit NULLS FIRST/LAST.
NULLS_SORT_SMALLEST = True

ERR_AUTH = 102  #: bad or unknown credentials -> shotgun_api3.AuthenticationFault
ERR_BAD_REQUEST = 103  #: unknown type/field, invalid filter or operator, invalid value
ERR_NOT_FOUND = 104  #: update/delete/revive of an entity that does not exist
ERR_NO_METHOD = 10000  #: unknown method_name (the code sgmock uses)

WIRE_DT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_WIRE_DT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
_DATE_RE = re.compile(r"^\d{4}-\d\d-\d\d$")

#: Identifier ("name") field of a linked entity, by type; first existing field wins.
NAME_FIELDS: dict[str, list[str]] = {
    "Task": ["content"],
    "Note": ["subject"],
    "Reply": ["content"],
    "HumanUser": ["name"],
    "ApiUser": ["firstname"],
    "Project": ["name"],
    "Group": ["name", "code"],
    "Department": ["name", "code"],
    "EventLogEntry": ["description"],
    "Ticket": ["title"],
    "Attachment": ["filename", "display_name"],
}
DEFAULT_NAME_FIELDS = ["code", "name", "title", "content"]

_TEXTLIKE = ("is", "is_not", "in", "not_in")
_ORDERED = ("is", "is_not", "less_than", "greater_than", "between", "not_between", "in", "not_in")
_RELATIVE = ("in_last", "not_in_last", "in_next", "not_in_next", "in_calendar_day", "in_calendar_week",
             "in_calendar_month", "in_calendar_year")
_ENTITY_OPS = ("is", "is_not", "in", "not_in", "type_is", "type_is_not", "name_is", "name_contains",
               "name_not_contains", "name_starts_with", "name_ends_with")
#: Relations allowed per data type (api3-protocol.md section 4, plus not_between on every ordered type).
OPERATORS: dict[str, tuple[str, ...]] = {
    "text": ("is", "is_not", "contains", "not_contains", "starts_with", "ends_with", "in", "not_in"),
    "number": _ORDERED, "currency": _ORDERED, "float": _ORDERED, "percent": _ORDERED,
    "duration": _ORDERED, "timecode": _ORDERED,
    "date": _ORDERED + _RELATIVE, "date_time": _ORDERED + _RELATIVE,
    "checkbox": ("is", "is_not"),
    "list": _TEXTLIKE, "status_list": _TEXTLIKE, "entity_type": _TEXTLIKE, "color": _TEXTLIKE,
    "uuid": _TEXTLIKE, "footage": _TEXTLIKE,
    "entity": _ENTITY_OPS, "multi_entity": _ENTITY_OPS,
    "tag_list": ("is", "is_not", "name_is", "name_contains", "name_not_contains"),
    "image": ("is", "is_not"),
}

#: The bidirectional pairs the fake keeps in step, writing the backref events SG writes: setting one
#: side (entity or multi_entity) changes the other side of each entity it links or unlinks. A pair is
#: active when both fields are in the site's schema. The project ships the same list (schema/pairs.yml)
#: and the tests check the two agree.
PAIRS: list[tuple[tuple[str, str], tuple[str, str]]] = [
    (("Task", "entity"), ("Shot", "tasks")),
    (("Task", "entity"), ("Asset", "tasks")),
    (("Task", "entity"), ("Sequence", "tasks")),
    (("Shot", "sg_sequence"), ("Sequence", "shots")),
    (("Shot", "assets"), ("Asset", "shots")),
    (("Asset", "parents"), ("Asset", "assets")),
    (("Note", "note_links"), ("Shot", "notes")),
    (("Note", "note_links"), ("Asset", "notes")),
    (("Note", "note_links"), ("Version", "notes")),
    (("Note", "note_links"), ("Sequence", "notes")),
    (("Note", "tasks"), ("Task", "notes")),
]
#: The pair behind task templates: the template's Tasks link the new entity through this field.
TEMPLATE_TASK_FIELD = ("Task", "entity")

RETIREMENT_FIELD = "retirement_date"


class SGFault(Exception):
    """An SG error; :meth:`FakeSite.call` turns it into the error envelope."""

    def __init__(self, message: str, code: int = ERR_BAD_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def fmt_dt(dt: datetime) -> str:
    """A datetime as SG's wire string ``YYYY-MM-DDTHH:MM:SSZ`` (naive means UTC)."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    return dt.strftime(WIRE_DT_FORMAT)


def parse_dt(value: Any) -> datetime | None:
    """Parse a wire datetime (or a bare date) into an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            if _WIRE_DT_RE.match(value):
                return datetime.strptime(value, WIRE_DT_FORMAT).replace(tzinfo=UTC)
            if _DATE_RE.match(value):
                return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:  # the right shape but no such time (2024-02-30, 25:00): SG refuses it
            pass
    raise SGFault(f"Invalid date_time value {value!r}")


def parse_date(value: Any) -> date | None:
    """Parse a ``YYYY-MM-DD`` string (or a wire datetime, taking its UTC date)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return parse_dt(value).date()  # type: ignore[union-attr]
    if isinstance(value, date):
        return value
    if isinstance(value, str) and _DATE_RE.match(value):
        try:
            return datetime.strptime(value, "%Y-%m-%d").date()
        except ValueError:  # the right shape but no such day (2024-02-30): SG refuses it
            pass
    if isinstance(value, str) and _WIRE_DT_RE.match(value):
        return parse_dt(value).date()  # type: ignore[union-attr]
    raise SGFault(f"Invalid date value {value!r}")


def to_wire(value: Any) -> Any:
    """Recursively turn datetime/date objects into their wire strings (for direct helpers)."""
    if isinstance(value, datetime):
        return fmt_dt(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value


def wire_filters(filters: Any, filter_operator: str = "all") -> dict[str, Any]:
    """Serialize python-form filters (lists / filter_operator groups) like the client does."""
    if isinstance(filters, dict) and "logical_operator" in filters:
        return to_wire(filters)
    op = "or" if filter_operator in ("any", "or") else "and"
    conditions = []
    for flt in filters or []:
        if isinstance(flt, dict):
            conditions.append(wire_filters(flt.get("filters", []), flt.get("filter_operator", "all")))
        else:
            values = list(flt[2:])
            if len(values) == 1 and isinstance(values[0], list | tuple):
                values = list(values[0])
            conditions.append({"path": flt[0], "relation": flt[1], "values": to_wire(values)})
    return {"logical_operator": op, "conditions": conditions}


def _shift(dt: datetime, n: int, unit: str) -> datetime:
    """``dt`` moved by ``n`` units (HOUR, DAY, WEEK, MONTH, YEAR); months clamp the day."""
    unit = unit.upper()
    if unit == "HOUR":
        return dt + timedelta(hours=n)
    if unit == "DAY":
        return dt + timedelta(days=n)
    if unit == "WEEK":
        return dt + timedelta(weeks=n)
    if unit in ("MONTH", "YEAR"):
        months = n * (12 if unit == "YEAR" else 1)
        total = dt.year * 12 + (dt.month - 1) + months
        year, month = divmod(total, 12)
        day = min(dt.day, calendar.monthrange(year, month + 1)[1])
        return dt.replace(year=year, month=month + 1, day=day)
    raise SGFault(f"Invalid filter: unknown date unit {unit!r}")


def _key(link: Any) -> tuple[str, int] | None:
    """(type, id) of an entity dict, or None."""
    if link is None:
        return None
    if not isinstance(link, dict) or "type" not in link or "id" not in link:
        raise SGFault(f"Invalid entity value {link!r}")
    return (link["type"], int(link["id"]))


@dataclass
class _Script:
    name: str
    key: str
    generate_events: bool
    api_user_id: int
    revoked: bool = False


@dataclass
class _Caller:
    """Who is making a call: the user link written to created_by/updated_by and to events."""

    user: dict[str, Any] | None
    generate_events: bool = True
    session_uuid: str | None = None
    sudo_as_login: str | None = None
    label: str = "system"


@dataclass
class _State:
    """All mutable data, so that batch can snapshot and roll back in one deepcopy."""

    rows: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    retired: dict[str, dict[int, str]] = field(default_factory=dict)  # id -> retirement date
    next_id: dict[str, int] = field(default_factory=dict)
    held_reserved: list[int] = field(default_factory=list)
    held_events: dict[int, dict[str, Any]] = field(default_factory=dict)


_SYSTEM = _Caller(user=None, label="system")


class FakeSite:
    """An in-memory SG site. Every public method holds one lock, so it is safe across server threads."""

    def __init__(
        self,
        schema: dict[str, Any] | None = None,
        entity_schema: dict[str, Any] | None = None,
        *,
        version: tuple[int, int, int] = (8, 50, 0),
        page_size: int = 500,
    ) -> None:
        self._lock = threading.RLock()
        self.schema: dict[str, dict[str, Any]] = copy.deepcopy(schema if schema is not None else basic_schema())
        self.entity_schema: dict[str, Any] = copy.deepcopy(entity_schema or make_entity_schema(self.schema))
        if "EventLogEntry" not in self.schema:
            self._add_default_event_schema()
        self.version = tuple(version)
        self.page_size = page_size
        self.events_enabled = True
        self._state = _State()
        self._clock: datetime | None = None
        #: the zone relative-date filters are read in (what SG uses for a script: see docs/semantics.md)
        self.timezone = "UTC"
        #: test hooks making the site answer one rule otherwise (tests/test_audit.py):
        #: "is_not-drops-null": a scalar ``is_not`` leaves out empty values;
        #: "sanitizes-lt": a ``<`` written to a text field is stored (and sent) as ``&lt;``;
        self.deviations: set[str] = set()
        self._scripts: dict[str, _Script] = {}
        self._humans: dict[str, tuple[str, int]] = {}
        self._sessions: dict[str, _Caller] = {}
        #: REST API access tokens handed out (tests/fakesg/rest.py): token -> the script's credentials.
        self.rest_tokens: dict[str, dict[str, str]] = {}
        self._task_templates: dict[int, tuple[str, list[dict[str, Any]]]] = {}
        self._pairs = list(PAIRS)
        self._display_column_id = 0
        self.requests: list[tuple[str, Any]] = []
        self.request_auth: list[dict[str, Any] | None] = []
        self.raw_requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.files = FakeFiles(self)  # uploads, storage, downloads (tests/fakesg/files.py)
        for t in self.schema:
            self._table(t)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def basic(cls, **kwargs: Any) -> FakeSite:
        """A site over :func:`schema_data.basic_schema`."""
        return cls(basic_schema(), **kwargs)

    def _add_default_event_schema(self) -> None:
        t = "EventLogEntry"
        fields = {
            "id": field_schema(t, "id", "number", editable=False),
            "created_at": field_schema(t, "created_at", "date_time", editable=False),
            "event_type": field_schema(t, "event_type", "text"),
            "attribute_name": field_schema(t, "attribute_name", "text"),
            "meta": field_schema(t, "meta", "serializable"),
            "entity": field_schema(t, "entity", "entity", valid_types=sorted(self.schema)),
            "project": field_schema(t, "project", "entity", valid_types=["Project"]),
            "user": field_schema(t, "user", "entity", valid_types=["HumanUser", "ApiUser"]),
            "session_uuid": field_schema(t, "session_uuid", "uuid"),
            "description": field_schema(t, "description", "text"),
        }
        self.schema[t] = fields
        self.entity_schema.setdefault(t, {"name": {"editable": False, "value": t}})

    def _table(self, entity_type: str) -> dict[int, dict[str, Any]]:
        st = self._state
        st.next_id.setdefault(entity_type, 1)
        st.retired.setdefault(entity_type, {})
        return st.rows.setdefault(entity_type, {})

    def _new_id(self, entity_type: str) -> int:
        self._table(entity_type)
        new_id = self._state.next_id[entity_type]
        self._state.next_id[entity_type] = new_id + 1
        return new_id

    # ------------------------------------------------------------------ clock
    def now(self) -> datetime:
        """The site clock (aware UTC, whole seconds): the frozen clock if set, else wall time."""
        with self._lock:
            now = self._clock or datetime.now(UTC)
            return now.replace(microsecond=0)

    def set_clock(self, dt: datetime | None) -> None:
        """Freeze the site clock at ``dt`` (naive means UTC); None returns to wall time."""
        with self._lock:
            self._clock = None if dt is None else parse_dt(dt)

    def advance_clock(self, **delta: float) -> datetime:
        """Move a frozen clock forward by ``timedelta(**delta)`` (freezing it at now first if needed)."""
        with self._lock:
            self._clock = self.now() + timedelta(**delta)
            return self._clock

    # ------------------------------------------------------------------ auth
    def add_script(self, name: str, key: str, generate_events: bool = True) -> dict[str, Any]:
        """Register an API script and its ApiUser row; returns the ApiUser link."""
        with self._lock:
            row = self._insert_row("ApiUser", {"firstname": name, "generate_event_log_entries": generate_events})
            self._scripts[name] = _Script(name, key, generate_events, row["id"])
            return self._link("ApiUser", row["id"])  # type: ignore[return-value]

    def has_script(self, name: str) -> bool:
        with self._lock:
            return name in self._scripts

    def revoke_script(self, name: str) -> None:
        """Make a script's key invalid (later calls fail with error 102)."""
        with self._lock:
            self._scripts[name].revoked = True

    def add_human(self, login: str, password: str, **fields: Any) -> dict[str, Any]:
        """Register a human login and its HumanUser row; returns the HumanUser link."""
        with self._lock:
            values = {"login": login, **fields}
            row = self._insert_row("HumanUser", values)
            self._humans[login] = (password, row["id"])
            return self._link("HumanUser", row["id"])  # type: ignore[return-value]

    def _insert_row(self, entity_type: str, values: dict[str, Any]) -> dict[str, Any]:
        """Insert a row without auth, events or validation beyond field existence (for setup rows)."""
        fields = self.schema.get(entity_type, {})
        row = self._blank_row(entity_type)
        for f, v in values.items():
            if f in fields:
                row[f] = v
        now = fmt_dt(self.now())
        for f in ("created_at", "updated_at"):
            if f in fields:
                row[f] = now
        self._table(entity_type)[row["id"]] = row
        return row

    def _authenticate(self, auth: Any) -> _Caller:
        if not isinstance(auth, dict):
            raise SGFault("Authentication failed: no credentials", ERR_AUTH)
        session_uuid = auth.get("session_uuid")
        sudo = auth.get("sudo_as_login")
        if any(not isinstance(auth.get(k, ""), str)
               for k in ("script_name", "script_key", "user_login", "user_password", "session_token")):
            raise SGFault("Authentication failed: invalid credentials", ERR_AUTH)
        if "script_name" in auth:
            script = self._scripts.get(auth.get("script_name"))
            if script is None or script.revoked or script.key != auth.get("script_key"):
                raise SGFault("Authentication failed: invalid script name or key", ERR_AUTH)
            return _Caller({"type": "ApiUser", "id": script.api_user_id}, script.generate_events,
                           session_uuid, sudo, script.name)
        if "user_login" in auth:
            entry = self._humans.get(auth.get("user_login"))
            if entry is None or entry[0] != auth.get("user_password"):
                raise SGFault("Authentication failed: invalid login or password", ERR_AUTH)
            return _Caller({"type": "HumanUser", "id": entry[1]}, True, session_uuid, sudo, auth["user_login"])
        if "session_token" in auth:
            caller = self._sessions.get(auth.get("session_token"))
            if caller is None:
                raise SGFault("Authentication failed: unknown session token", ERR_AUTH)
            return _Caller(caller.user, caller.generate_events, session_uuid, sudo, caller.label)
        raise SGFault("Authentication failed: no credentials", ERR_AUTH)

    def accepts(self, auth: dict[str, Any]) -> bool:
        """Whether the credentials ``auth`` (API3's auth keys) are ones the site accepts."""
        with self._lock:
            try:
                self._authenticate(auth)
            except SGFault:
                return False
            return True

    def authenticate_form(self, form: dict[str, Any]) -> None:
        """Check the credentials an upload form carries (its auth fields); raises SGFault."""
        auth = {k: v for k, v in form.items()
                if k in ("script_name", "script_key", "user_login", "user_password", "session_token")}
        with self._lock:
            self._authenticate(auth)

    # ------------------------------------------------------------------ request log
    def record_raw(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        """Record one HTTP request (called by the server for every request)."""
        with self._lock:
            self.raw_requests.append((method, path, dict(headers), body))

    def count(self, method_name: str, type: str | None = None) -> int:  # noqa: A002 - mirrors SG's param
        """How many /api3/json calls of ``method_name`` (optionally on entity ``type``) were received."""
        with self._lock:
            n = 0
            for name, params in self.requests:
                if name != method_name:
                    continue
                if type is not None:
                    items = params if isinstance(params, list) else [params]
                    if not any(isinstance(p, dict) and p.get("type") == type for p in items):
                        continue
                n += 1
            return n

    def count_by_script(self, method_name: str, script_name: str) -> int:
        """How many /api3/json calls of ``method_name`` came with the credentials of script ``script_name``."""
        with self._lock:
            return sum(1 for (name, _params), auth in zip(self.requests, self.request_auth, strict=True)
                       if name == method_name and isinstance(auth, dict) and auth.get("script_name") == script_name)

    def reset_counts(self) -> None:
        """Forget recorded requests (both the API log and the raw HTTP log)."""
        with self._lock:
            self.requests.clear()
            self.request_auth.clear()
            self.raw_requests.clear()

    # ------------------------------------------------------------------ dispatch
    def info(self) -> dict[str, Any]:
        """The bare ``info`` reply."""
        major, minor, patch = self.version
        return {
            "version": [major, minor, patch],
            "full_version": [major, minor, patch, 0],
            "api_max_entities_per_page": self.page_size,
            "user_authentication_method": "default",
            **self.files.info_keys(),
        }

    def call(self, method_name: str, params: Any) -> dict[str, Any]:
        """Run one API3 method; ``params`` is the wire ``params`` list. Returns the JSON envelope."""
        with self._lock:
            params = copy.deepcopy(params) if params is not None else []
            if not isinstance(params, list):
                params = [params]
            method_params = params[1] if len(params) > 1 else None
            self.requests.append((method_name, copy.deepcopy(method_params)))
            self.request_auth.append(params[0] if params and isinstance(params[0], dict) else None)
            try:
                if method_name == "info":
                    return self.info()
                handler = self._METHODS.get(method_name)
                if handler is None:
                    raise SGFault(f"Unknown method {method_name!r}", ERR_NO_METHOD)
                caller = self._authenticate(params[0] if params else None)
                return {"results": handler(self, method_params, caller)}
            except SGFault as exc:
                log.info("fake SG %s -> error %s: %s", method_name, exc.code, exc.message)
                return {"exception": True, "error_code": exc.code, "message": exc.message}

    # ------------------------------------------------------------------ schema helpers
    def _fields(self, entity_type: str, api: str = "read") -> dict[str, Any]:
        fields = self.schema.get(entity_type)
        if fields is None:
            raise SGFault(f"API {api}() {entity_type} entity type doesn't exist")
        return fields

    def _dtype(self, entity_type: str, field_name: str, api: str = "read") -> str:
        fields = self._fields(entity_type, api)
        if field_name == "id":
            return "number"
        spec = fields.get(field_name)
        if spec is None:
            raise SGFault(f"API {api}() {entity_type}.{field_name} doesn't exist")
        return spec["data_type"]["value"]

    def _prop(self, entity_type: str, field_name: str, prop: str) -> Any:
        spec = self.schema.get(entity_type, {}).get(field_name, {})
        return spec.get("properties", {}).get(prop, {}).get("value")

    def _name_field(self, entity_type: str) -> str | None:
        fields = self.schema.get(entity_type, {})
        for f in NAME_FIELDS.get(entity_type, DEFAULT_NAME_FIELDS):
            if f in fields:
                return f
        return None

    def _blank_row(self, entity_type: str) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self._new_id(entity_type)}
        for f, spec in self.schema.get(entity_type, {}).items():
            if f == "id":
                continue
            dt = spec["data_type"]["value"]
            default = spec.get("properties", {}).get("default_value", {}).get("value")
            if dt == "multi_entity":
                row[f] = []
            elif dt == "checkbox":
                row[f] = bool(default)
            elif dt == "tag_list":
                row[f] = []
            else:
                row[f] = copy.deepcopy(default) if dt in ("status_list", "list", "number", "text") else None
        return row

    # ------------------------------------------------------------------ rows and links
    def _row(self, entity_type: str, entity_id: int, active_only: bool = True) -> dict[str, Any] | None:
        row = self._state.rows.get(entity_type, {}).get(entity_id)
        if row is None or (active_only and entity_id in self._state.retired.get(entity_type, ())):
            return None
        return row

    def _is_retired(self, entity_type: str, entity_id: int) -> bool:
        return entity_id in self._state.retired.get(entity_type, ())

    def display_name(self, entity_type: str, row: dict[str, Any]) -> str | None:
        """The ``name`` an entity link to this row carries."""
        if entity_type == "HumanUser":
            if row.get("name"):
                return row["name"]
            full = f"{row.get('firstname') or ''} {row.get('lastname') or ''}".strip()
            return full or row.get("login")
        name_field = self._name_field(entity_type)
        return row.get(name_field) if name_field else None

    def _link(self, entity_type: str, entity_id: int, include_retired: bool = False) -> dict[str, Any] | None:
        row = self._row(entity_type, entity_id, active_only=not include_retired)
        if row is None:
            return None
        return {"type": entity_type, "id": entity_id, "name": self.display_name(entity_type, row)}

    def _render_link(self, stored: dict[str, Any] | None, include_retired: bool = False) -> dict[str, Any] | None:
        """A stored ``{type, id}`` as the wire ``{type, id, name}``; None if gone or retired."""
        if stored is None:
            return None
        if stored["type"] not in self.schema:
            # Types the fake does not model (DisplayColumn...) keep what was stored.
            return {"type": stored["type"], "id": stored["id"], "name": stored.get("name")}
        return self._link(stored["type"], stored["id"], include_retired)

    def _render(self, dt: str, stored: Any, include_retired: bool = False) -> Any:
        if dt == "entity":
            return self._render_link(stored, include_retired)
        if dt == "multi_entity":
            out = [self._render_link(s, include_retired) for s in stored or []]
            return [x for x in out if x is not None]
        if dt == "tag_list":
            return list(stored or [])
        return copy.deepcopy(stored)

    def _field_value(self, entity_type: str, row: dict[str, Any], field_name: str) -> Any:
        if field_name == "id":
            return row["id"]
        if field_name == "type":
            return entity_type
        return self._render(self._dtype(entity_type, field_name), row.get(field_name))

    def _check_path(self, entity_type: str, path: str, api: str = "read") -> tuple[str, str, str]:
        """Validate a (possibly deep) path; returns (final type, final field, final data type)."""
        parts = path.split(".")
        if len(parts) % 2 == 0:
            raise SGFault(f"API {api}() {entity_type}.{path} doesn't exist")
        cur = entity_type
        for i in range(0, len(parts) - 1, 2):
            dt = self._dtype(cur, parts[i], api)
            if dt not in ("entity", "multi_entity"):
                raise SGFault(f"API {api}() {cur}.{parts[i]} is not an entity field (in path {path})")
            cur = parts[i + 1]
            if cur not in self.schema:
                raise SGFault(f"API {api}() {cur} entity type doesn't exist (in path {path})")
        if parts[-1] == "type":
            return cur, "type", "entity_type"
        return cur, parts[-1], self._dtype(cur, parts[-1], api)

    def _resolve(self, entity_type: str, row: dict[str, Any], path: str) -> Any:
        """Rendered value of a (deep) return/sort path; a mismatched or multi_entity hop gives None."""
        parts = path.split(".")
        cur_type, cur_row = entity_type, row
        for i in range(0, len(parts) - 1, 2):
            stored = cur_row.get(parts[i])
            if not isinstance(stored, dict) or stored.get("type") != parts[i + 1]:
                return None
            nxt = self._row(parts[i + 1], stored["id"])
            if nxt is None:
                return None
            cur_type, cur_row = parts[i + 1], nxt
        return self._field_value(cur_type, cur_row, parts[-1])

    def _candidates(self, entity_type: str, row: dict[str, Any], parts: list[str]) -> list[Any]:
        """Stored values a filter path reaches: one through entity hops (None if the hop fails, a LEFT
        JOIN), any number through multi_entity hops (EXISTS: no linked entity gives no candidate)."""
        if len(parts) == 1:
            if parts[0] == "id":
                return [row["id"]]
            if parts[0] == "type":
                return [entity_type]
            return [row.get(parts[0])]
        stored = row.get(parts[0])
        target = parts[1]
        if isinstance(stored, list):
            out: list[Any] = []
            for link in stored:
                if link.get("type") == target:
                    nxt = self._row(target, link["id"])
                    if nxt is not None:
                        out.extend(self._candidates(target, nxt, parts[2:]))
            return out
        if not isinstance(stored, dict) or stored.get("type") != target:
            return self._no_hop(target, parts[2:])
        nxt = self._row(target, stored["id"])
        if nxt is None:
            return self._no_hop(target, parts[2:])
        return self._candidates(target, nxt, parts[2:])

    def _no_hop(self, entity_type: str, parts: list[str]) -> list[Any]:
        """The candidates of a path whose single-entity hop found no row: None (the LEFT JOIN's NULL),
        or none at all when the rest of the path crosses a multi_entity hop. The rule is the one for
        multi_entity hops (docs/semantics.md, "Deep paths": EXISTS, no linked entity, no match,
        whatever the operator); giving None there made ``is_not``/``not_in``/``is None`` through
        ``sg_sequence.Sequence.tasks.Task.entity`` match rows with no sequence (found by
        tests/test_read_differential.py)."""
        cur = entity_type
        for i in range(0, len(parts) - 1, 2):
            if self._dtype(cur, parts[i]) == "multi_entity":
                return []
            cur = parts[i + 1]
        return [None]

    # ------------------------------------------------------------------ filters
    def _compile(self, entity_type: str, flt: Any) -> Callable[[dict[str, Any]], bool]:
        """Compile a wire filter (group or condition) into a row predicate."""
        if flt is None:
            return lambda row: True
        if isinstance(flt, list):
            flt = wire_filters(flt)
        if not isinstance(flt, dict):
            raise SGFault(f"Invalid filter {flt!r}")
        if "conditions" in flt or "logical_operator" in flt:
            op = flt.get("logical_operator", "and")
            if op not in ("and", "or"):
                raise SGFault(f"Invalid filter: logical_operator {op!r}")
            preds = [self._compile(entity_type, c) for c in flt.get("conditions", [])]
            if op == "and":
                return lambda row: all(p(row) for p in preds)
            return lambda row: any(p(row) for p in preds)
        if "filters" in flt:  # python-form group passed through
            return self._compile(entity_type, wire_filters(flt["filters"], flt.get("filter_operator", "all")))
        path, relation, values = flt.get("path"), flt.get("relation"), flt.get("values")
        if not isinstance(path, str) or not isinstance(relation, str):
            raise SGFault(f"Invalid filter {flt!r}")
        if values is None:
            values = []
        if not isinstance(values, list):
            values = [values]
        _t, _f, dt = self._check_path(entity_type, path)
        if relation not in OPERATORS.get(dt, ()):
            raise SGFault(f"Invalid filter: the {relation!r} operator is not supported on {dt} field "
                          f"{entity_type}.{path}")
        match = self._matcher(dt, relation, values, f"{entity_type}.{path}")
        parts = path.split(".")
        if len(parts) == 1:
            return lambda row: match(self._candidates(entity_type, row, parts)[0])
        return lambda row: any(match(v) for v in self._candidates(entity_type, row, parts))

    def _lower(self, text: str) -> str:
        """Text lowered for case-insensitive matching and sorting as SG's PostgreSQL does (lower()
        in a UTF-8 locale): one character at a time with Unicode's simple mapping, so a final 'Σ'
        is 'σ' and 'İ' is 'i' (Python's str.lower() gives 'ς' and 'i̇'; docs/semantics.md)."""
        if text.isascii():  # (the same either way; per character is slow on long text)
            return text.lower()
        # U+0130 is the one letter whose full lower-case mapping is not its simple one
        return "".join("i" if c == "\u0130" else c.lower() for c in text)

    def _norm_scalar(self, dt: str, value: Any) -> Any:
        if value is None:
            return None
        if dt == "text":
            return self._lower(str(value))
        if dt == "date_time":
            return parse_dt(value)
        if dt == "date":
            return parse_date(value)
        if dt == "checkbox":
            return bool(value)
        return value

    def _matcher(self, dt: str, relation: str, values: list[Any], where: str) -> Callable[[Any], bool]:
        """Predicate over one stored value for ``relation`` with ``values``."""

        def need(n: int) -> None:
            if len(values) != n:
                raise SGFault(f"Invalid filter on {where}: {relation} expects {n} value(s), got {values!r}")

        if dt in ("entity", "multi_entity"):
            return self._entity_matcher(dt, relation, values, where, need)
        if dt == "tag_list":
            return self._tag_matcher(relation, values, need)
        if dt == "image":
            need(1)
            if values[0] is not None:
                raise SGFault(f"Invalid filter on {where}: image fields compare with None only")
            return (lambda v: v is None) if relation == "is" else (lambda v: v is not None)
        if relation in _RELATIVE:
            return self._relative_matcher(dt, relation, values, where)
        norm = [self._norm_scalar(dt, x) for x in values]
        if dt == "checkbox":
            def cb(v: Any) -> bool:
                return bool(v)
            key: Callable[[Any], Any] = cb
        else:
            def key(v: Any) -> Any:
                return self._norm_scalar(dt, v)

        if relation in ("is", "is_not"):
            need(1)
            want = norm[0]
            if relation == "is":
                return lambda v: key(v) == want
            if "is_not-drops-null" in self.deviations:  # a test hook: a site that reads one rule otherwise
                return lambda v: v is not None and key(v) != want
            return lambda v: key(v) != want
        if relation in ("in", "not_in"):
            wanted = norm
            if relation == "in":
                return lambda v: key(v) in wanted
            return lambda v: key(v) not in wanted
        if relation in ("less_than", "greater_than"):
            need(1)
            x = norm[0]

            def cmp(v: Any) -> bool:
                kv = key(v)
                if kv is None or x is None:
                    return False
                return kv < x if relation == "less_than" else kv > x
            return cmp
        if relation in ("between", "not_between"):
            need(2)
            lo, hi = norm

            def between(v: Any) -> bool:
                kv = key(v)
                if kv is None:
                    return False
                inside = (lo is None or kv >= lo) and (hi is None or kv <= hi)
                return inside if relation == "between" else not inside
            return between
        if relation in ("contains", "not_contains", "starts_with", "ends_with"):
            need(1)
            x = norm[0] or ""

            def text(v: Any) -> bool:
                kv = key(v)
                if kv is None:
                    return relation == "not_contains"
                if relation == "contains":
                    return x in kv
                if relation == "not_contains":
                    return x not in kv
                if relation == "starts_with":
                    return kv.startswith(x)
                return kv.endswith(x)
            return text
        raise SGFault(f"Invalid filter on {where}: unknown relation {relation!r}")

    def _relative_matcher(self, dt: str, relation: str, values: list[Any], where: str) -> Callable[[Any], bool]:
        """Relative dates in the site's time zone (tests/fakesg/relative.py)."""
        predicate = relative_predicate(self.now(), ZoneInfo(self.timezone), dt, relation, values,
                                       _shift, parse_dt, parse_date)
        if predicate is None:
            raise SGFault(f"Invalid filter on {where}: {relation} expects "
                          + ("[offset]" if relation.startswith("in_calendar_") else "[n, unit]"))
        return predicate

    def _link_name(self, stored: dict[str, Any]) -> str | None:
        link = self._render_link(stored)
        return link.get("name") if link else None

    def _entity_matcher(self, dt: str, relation: str, values: list[Any], where: str,
                        need: Callable[[int], None]) -> Callable[[Any], bool]:
        multi = dt == "multi_entity"

        def active_keys(v: Any) -> list[tuple[str, int]]:
            links = (v or []) if multi else ([v] if v is not None else [])
            return [(s["type"], s["id"]) for s in links if self._render_link(s) is not None]

        def names(v: Any) -> list[str]:
            links = (v or []) if multi else ([v] if v is not None else [])
            out = []
            for s in links:
                link = self._render_link(s)
                if link is not None:
                    out.append(self._lower(link.get("name") or ""))
            return out

        if relation in ("is", "is_not", "in", "not_in"):
            if relation in ("is", "is_not"):
                need(1)
            wanted = [_key(x) for x in values]
            want_none = None in wanted
            want = {w for w in wanted if w is not None}

            def hit(v: Any) -> bool:
                keys = active_keys(v)
                return (want_none and not keys) or any(k in want for k in keys)
            if relation in ("is", "in"):
                return hit
            return lambda v: not hit(v)
        if relation in ("type_is", "type_is_not"):
            need(1)
            tname = values[0]

            def type_hit(v: Any) -> bool:
                keys = active_keys(v)
                return not keys if tname is None else any(k[0] == tname for k in keys)
            return type_hit if relation == "type_is" else (lambda v: not type_hit(v))
        need(1)
        x = self._lower(str(values[0] or ""))
        tests: dict[str, Callable[[str], bool]] = {
            "name_is": lambda n: n == x,
            "name_contains": lambda n: x in n,
            "name_not_contains": lambda n: x in n,
            "name_starts_with": lambda n: n.startswith(x),
            "name_ends_with": lambda n: n.endswith(x),
        }
        test = tests[relation]
        if relation == "name_not_contains":
            return lambda v: not any(test(n) for n in names(v))
        return lambda v: any(test(n) for n in names(v))

    def _tag_matcher(self, relation: str, values: list[Any], need: Callable[[int], None]) -> Callable[[Any], bool]:
        need(1)
        x = values[0]
        if isinstance(x, dict):
            x = x.get("name")

        def tags(v: Any) -> list[str]:
            return [str(t).lower() for t in v or []]

        if relation in ("is", "is_not"):
            def has(v: Any) -> bool:
                return not tags(v) if x is None else str(x).lower() in tags(v)
            return has if relation == "is" else (lambda v: not has(v))
        xl = str(x or "").lower()
        if relation == "name_is":
            return lambda v: xl in tags(v)
        if relation == "name_contains":
            return lambda v: any(xl in t for t in tags(v))
        return lambda v: not any(xl in t for t in tags(v))

    # ------------------------------------------------------------------ read
    def _sort_value(self, dt: str, value: Any) -> Any:
        if dt == "entity":
            return self._lower(value.get("name") or "") if value else None
        if dt == "multi_entity":
            return self._lower(value[0].get("name") or "") if value else None
        if dt in ("text", "list", "status_list", "entity_type", "color", "uuid", "footage"):
            return None if value is None else self._lower(str(value))
        if dt in ("url", "serializable", "tag_list"):
            return None if value in (None, []) else json.dumps(value, sort_keys=True)
        if dt == "checkbox":
            return bool(value)
        return value

    def _sort(self, entity_type: str, rows: list[dict[str, Any]], sorts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sort by each key (stable, last key first); the base order is id ascending (the tie-break)."""
        out = sorted(rows, key=lambda r: r["id"])
        for spec in reversed(sorts or []):
            path = spec.get("field_name") or spec.get("column")
            direction = spec.get("direction", "asc")
            if direction not in ("asc", "desc"):
                raise SGFault(f"Invalid sort direction {direction!r}")
            _t, _f, dt = self._check_path(entity_type, path)
            desc = direction == "desc"

            def sort_key(row: dict[str, Any], path: str = path, dt: str = dt) -> tuple[int, Any]:
                v = self._sort_value(dt, self._resolve(entity_type, row, path))
                if v is None:
                    return (0, 0) if NULLS_SORT_SMALLEST else (2, 0)
                return (1, v)
            out.sort(key=sort_key, reverse=desc)
        return out

    def _archived_projects(self) -> set[int]:
        projects = self._state.rows.get("Project", {})
        return {pid for pid, row in projects.items() if row.get("archived")}

    def _read(self, params: dict[str, Any], caller: _Caller) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise SGFault("API read() expects a dict of params")
        entity_type = params.get("type")
        self._fields(entity_type)
        return_fields = params.get("return_fields") or ["id"]
        for path in return_fields:
            self._check_path(entity_type, path)
        pred = self._compile(entity_type, params.get("filters"))
        return_only = params.get("return_only", "active")
        if return_only not in ("active", "retired"):
            raise SGFault(f"API read() invalid return_only {return_only!r}")
        retired = self._state.retired.get(entity_type, {})
        archived = self._archived_projects() if params.get("include_archived_projects") is False else set()
        matched = []
        for row in self._state.rows.get(entity_type, {}).values():
            if (row["id"] in retired) != (return_only == "retired"):
                continue
            if archived:
                proj = row["id"] if entity_type == "Project" else (row.get("project") or {}).get("id")
                proj_type = "Project" if entity_type == "Project" else (row.get("project") or {}).get("type")
                if proj_type == "Project" and proj in archived:
                    continue
            if pred(row):
                matched.append(row)
        ordered = self._sort(entity_type, matched, params.get("sorts") or [])
        paging = params.get("paging") or {}
        per_page = int(paging.get("entities_per_page") or self.page_size)
        page = int(paging.get("current_page") or 1)
        if per_page < 1 or page < 1:
            raise SGFault("API read() invalid paging")
        chunk = ordered[(page - 1) * per_page: page * per_page]
        entities = []
        for row in chunk:
            ent: dict[str, Any] = {"type": entity_type, "id": row["id"]}
            for path in return_fields:
                if path not in ("type", "id"):
                    ent[path] = self._resolve(entity_type, row, path)
            entities.append(ent)
        paging_info: dict[str, Any] = {"has_next_page": len(ordered) > page * per_page}
        if params.get("return_paging_info"):
            paging_info["entity_count"] = len(ordered)
        return {"entities": entities, "paging_info": paging_info}

    # ------------------------------------------------------------------ writes: values
    def _coerce(self, entity_type: str, field_name: str, value: Any, api: str) -> Any:
        """Validate a written value; returns its stored form (links as ``{type, id}``)."""
        dt = self._dtype(entity_type, field_name, api)
        where = f"API {api}() {entity_type}.{field_name}"
        if field_name == "id" or dt in ("summary", "pivot_column", "calculated"):
            raise SGFault(f"{where} is not editable")
        if value is None:
            if dt in ("multi_entity", "tag_list"):
                return []
            return False if dt == "checkbox" else None
        if dt == "entity":
            return self._coerce_link(entity_type, field_name, value, where)
        if dt == "multi_entity":
            if not isinstance(value, list):
                raise SGFault(f"{where} expects a list of entities, got {value!r}")
            out: list[dict[str, Any]] = []
            for v in value:
                link = self._coerce_link(entity_type, field_name, v, where)
                if link is not None and link not in out:
                    out.append(link)
            return out
        checks: dict[str, Callable[[Any], bool]] = {
            "number": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "duration": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "timecode": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "percent": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            "currency": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            "checkbox": lambda v: isinstance(v, bool),
            "text": lambda v: isinstance(v, str),
            "entity_type": lambda v: isinstance(v, str),
            "color": lambda v: isinstance(v, str),
            "uuid": lambda v: isinstance(v, str),
            "footage": lambda v: isinstance(v, str),
            "image": lambda v: isinstance(v, str),
            "url": lambda v: isinstance(v, dict),
            "list": lambda v: isinstance(v, str),
            "status_list": lambda v: isinstance(v, str),
            "date": lambda v: isinstance(v, str) and bool(_DATE_RE.match(v)),
            "date_time": lambda v: isinstance(v, str) and bool(_WIRE_DT_RE.match(v)),
            "tag_list": lambda v: isinstance(v, list),
        }
        check = checks.get(dt)
        if check is not None and not check(value):
            raise SGFault(f"{where} ({dt}) cannot take the value {value!r}")
        if dt in ("list", "status_list"):
            valid = self._prop(entity_type, field_name, "valid_values") or []
            if valid and value not in valid:
                raise SGFault(f"{where}: {value!r} is not a valid value (valid: {valid})")
        if dt == "tag_list":
            return [v.get("name") if isinstance(v, dict) else str(v) for v in value]
        if dt == "text" and "sanitizes-lt" in self.deviations:
            return value.replace("<", "&lt;")  # SG's input sanitization (shotgun_api3 reverts it on reads)
        return copy.deepcopy(value)

    def _coerce_link(self, entity_type: str, field_name: str, value: Any, where: str) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or "type" not in value or "id" not in value:
            raise SGFault(f"{where} expects an entity dict, got {value!r}")
        ltype, lid = value["type"], value["id"]
        valid = self._prop(entity_type, field_name, "valid_types") or []
        if valid and ltype not in valid:
            raise SGFault(f"{where}: type {ltype} is not a valid type (valid: {valid})")
        if ltype in self.schema:
            if self._row(ltype, lid) is None:
                raise SGFault(f"{where}: {ltype} {lid} does not exist")
            return {"type": ltype, "id": lid}
        return {"type": ltype, "id": lid, "name": value.get("name")}

    # ------------------------------------------------------------------ events
    def _events_on(self, caller: _Caller) -> bool:
        return self.events_enabled and caller.generate_events

    def _project_of(self, entity_type: str, row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        if entity_type == "Project":
            return {"type": "Project", "id": row["id"]}
        proj = row.get("project")
        return {"type": proj["type"], "id": proj["id"]} if isinstance(proj, dict) else None

    def _write_event(self, caller: _Caller, event_type: str, entity: dict[str, Any] | None,
                     attribute_name: str | None, meta: dict[str, Any] | None,
                     project: dict[str, Any] | None = None, description: str | None = None) -> int | None:
        """Append one EventLogEntry (held if ids are reserved); returns its id, or None if events are off."""
        if not self._events_on(caller):
            return None
        st = self._state
        held = bool(st.held_reserved)
        event_id = st.held_reserved.pop(0) if held else self._new_id("EventLogEntry")
        ev: dict[str, Any] = {
            "id": event_id,
            "event_type": event_type,
            "attribute_name": attribute_name,
            "meta": meta,
            "entity": {"type": entity["type"], "id": entity["id"],
                       **({"name": entity["name"]} if entity["type"] not in self.schema else {})}
            if entity else None,
            "project": project,
            "user": {"type": caller.user["type"], "id": caller.user["id"]} if caller.user else None,
            "created_at": fmt_dt(self.now()),
            "session_uuid": caller.session_uuid,
            "description": description or event_type,
        }
        fields = self.schema["EventLogEntry"]
        row = {f: ev.get(f) for f in fields if f != "id"}
        row["id"] = event_id
        for f, spec in fields.items():
            if row.get(f) is None and spec["data_type"]["value"] == "multi_entity":
                row[f] = []
        if held:
            st.held_events[event_id] = row
        else:
            self._table("EventLogEntry")[event_id] = row
        return event_id

    def _change_event(self, caller: _Caller, entity_type: str, row: dict[str, Any], field_name: str,
                      dt: str, old: Any, new: Any, in_create: bool = False,
                      extra: dict[str, Any] | None = None) -> int | None:
        """One Shotgun_<T>_Change event for ``field_name`` (old/new or added/removed for multi_entity)."""
        meta: dict[str, Any] = {"type": "attribute_change", "attribute_name": field_name,
                                "entity_type": entity_type, "entity_id": row["id"], "field_data_type": dt}
        if dt == "multi_entity":
            old_l = self._render(dt, old, include_retired=True)
            new_l = self._render(dt, new, include_retired=True)
            old_k = {(x["type"], x["id"]) for x in old_l}
            new_k = {(x["type"], x["id"]) for x in new_l}
            meta["added"] = [x for x in new_l if (x["type"], x["id"]) not in old_k]
            meta["removed"] = [x for x in old_l if (x["type"], x["id"]) not in new_k]
        else:
            meta["old_value"] = self._render(dt, old, include_retired=True)
            meta["new_value"] = self._render(dt, new, include_retired=True)
        if in_create:
            meta["in_create"] = True
        if extra:
            meta.update(extra)
        entity = {"type": entity_type, "id": row["id"]}
        return self._write_event(caller, f"Shotgun_{entity_type}_Change", entity, field_name, meta,
                                 self._project_of(entity_type, row),
                                 f"{caller.label} changed {entity_type}.{field_name} on {entity_type} {row['id']}")

    # ------------------------------------------------------------------ writes
    def _create(self, params: dict[str, Any], caller: _Caller, api: str = "create") -> dict[str, Any]:
        if not isinstance(params, dict):
            raise SGFault(f"API {api}() expects a dict of params")
        entity_type = params.get("type")
        fields = self._fields(entity_type, api)
        requested = params.get("fields") or []
        return_fields = params.get("return_fields") or ["id"]
        for path in return_fields:
            self._check_path(entity_type, path, api)
        values: dict[str, Any] = {}
        for item in requested:
            name = item.get("field_name")
            values[name] = self._coerce(entity_type, name, item.get("value"), api)
        row = self._blank_row(entity_type)
        defaulted = [f for f, v in row.items() if f != "id" and v not in (None, [], False)]
        row.update(values)
        now = fmt_dt(self.now())
        for f in ("created_at", "updated_at"):
            if f in fields and f not in values:
                row[f] = now
        for f in ("created_by", "updated_by"):
            if f in fields and f not in values and caller.user is not None:
                row[f] = {"type": caller.user["type"], "id": caller.user["id"]}
        self._table(entity_type)[row["id"]] = row
        if entity_type != "EventLogEntry":
            entity = {"type": entity_type, "id": row["id"]}
            project = self._project_of(entity_type, row)
            self._write_event(caller, f"Shotgun_{entity_type}_New", entity, None,
                              {"type": "new_entity", "entity_type": entity_type, "entity_id": row["id"]},
                              project, f"{caller.label} created new {entity_type} {row['id']}")
            for f in list(values) + [f for f in defaulted if f not in values]:
                dt = self._dtype(entity_type, f)
                blank = [] if dt in ("multi_entity", "tag_list") else None
                ev_id = self._change_event(caller, entity_type, row, f, dt, blank, row[f], in_create=True)
                self._pair_sync(caller, entity_type, row, f, blank, row[f], ev_id, in_create=True)
            self._apply_task_template(caller, entity_type, row)
            if entity_type == "HumanUser" and "name" not in values:
                self._compose_name(caller, row, in_create=True)
        result: dict[str, Any] = {"type": entity_type, "id": row["id"]}
        for f in values:
            result[f] = self._field_value(entity_type, row, f)
        for path in return_fields:
            if path not in ("type", "id"):
                result[path] = self._resolve(entity_type, row, path)
        return result

    def _update(self, params: dict[str, Any], caller: _Caller, api: str = "update") -> dict[str, Any]:
        if not isinstance(params, dict):
            raise SGFault(f"API {api}() expects a dict of params")
        entity_type, entity_id = params.get("type"), params.get("id")
        self._fields(entity_type, api)
        if entity_type == "EventLogEntry":
            raise SGFault(f"API {api}() EventLogEntry entries cannot be updated")
        row = self._row(entity_type, entity_id)
        if row is None:
            raise SGFault(f"API {api}() {entity_type} {entity_id} does not exist", ERR_NOT_FOUND)
        batch_mode = params.get("multi_entity_update_mode")
        changes: list[tuple[str, str, Any, Any]] = []
        new_values: dict[str, Any] = {}
        for item in params.get("fields") or []:
            name = item.get("field_name")
            new = self._coerce(entity_type, name, item.get("value"), api)
            dt = self._dtype(entity_type, name, api)
            old = new_values.get(name, row.get(name))
            if dt == "multi_entity":
                mode = item.get("multi_entity_update_mode") or batch_mode or "set"
                if isinstance(mode, dict):
                    mode = mode.get(name, "set")
                if mode == "add":
                    new = list(old or []) + [x for x in new if x not in (old or [])]
                elif mode == "remove":
                    gone = {_key(x) for x in new}
                    new = [x for x in old or [] if _key(x) not in gone]
                elif mode != "set":
                    raise SGFault(f"API {api}() invalid multi_entity_update_mode {mode!r}")
            new_values[name] = new
            changes.append((name, dt, old, new))
        changed_any = False
        start_before = row.get("start_date")
        for name, dt, _old, new in changes:
            old = row.get(name)
            if old == new:
                continue
            changed_any = True
            row[name] = new
            ev_id = self._change_event(caller, entity_type, row, name, dt, old, new)
            self._pair_sync(caller, entity_type, row, name, old, new, ev_id)
        if entity_type == "Task" and "due_date" not in new_values:
            self._keep_duration(caller, row, start_before)
        if entity_type == "HumanUser" and {"firstname", "lastname"} & set(new_values) and "name" not in new_values:
            self._compose_name(caller, row)
        if changed_any:
            if "updated_at" in self.schema[entity_type]:
                row["updated_at"] = fmt_dt(self.now())
            if "updated_by" in self.schema[entity_type] and caller.user is not None:
                row["updated_by"] = {"type": caller.user["type"], "id": caller.user["id"]}
        result: dict[str, Any] = {"type": entity_type, "id": entity_id}
        for name, _dt, _old, _new in changes:
            result[name] = self._field_value(entity_type, row, name)
        return result

    def _keep_duration(self, caller: _Caller, row: dict[str, Any], start_before: Any) -> None:
        """SG's rule for a Task whose start date moves: the due date moves with it, the duration
        stays (its documentation, "Updating Task Dates"; here in calendar days). Logged as SG logs
        any change."""
        start, due = row.get("start_date"), row.get("due_date")
        if not (isinstance(start_before, str) and isinstance(start, str) and isinstance(due, str)) \
                or start == start_before:
            return
        shift = date.fromisoformat(start) - date.fromisoformat(start_before)
        moved = (date.fromisoformat(due) + shift).isoformat()
        row["due_date"] = moved
        self._change_event(caller, "Task", row, "due_date", "date", due, moved)

    def _compose_name(self, caller: _Caller, row: dict[str, Any], in_create: bool = False) -> None:
        """A person's name, composed from the first and last names when a write sets them (as the
        proxy assumes SG does: a person is created with the two and read back with a name; not
        documented). Logged as any change."""
        if "name" not in self.schema["HumanUser"]:
            return
        composed = f"{row.get('firstname') or ''} {row.get('lastname') or ''}".strip()
        if not composed or row.get("name") == composed:
            return
        old, row["name"] = row.get("name"), composed
        self._change_event(caller, "HumanUser", row, "name", "text", old, composed, in_create=in_create)

    def _retirement_date(self) -> str:
        return self.now().strftime("%Y-%m-%d %H:%M:%S UTC")

    def _delete(self, params: dict[str, Any], caller: _Caller, api: str = "delete") -> bool:
        entity_type, entity_id = params.get("type"), params.get("id")
        self._fields(entity_type, api)
        if entity_type == "EventLogEntry":
            raise SGFault(f"API {api}() EventLogEntry entries cannot be deleted")
        row = self._row(entity_type, entity_id, active_only=False)
        if row is None:
            raise SGFault(f"API {api}() {entity_type} {entity_id} does not exist", ERR_NOT_FOUND)
        if self._is_retired(entity_type, entity_id):
            return False
        name = self.display_name(entity_type, row)
        project = self._project_of(entity_type, row)
        when = self._retirement_date()
        entity = {"type": entity_type, "id": entity_id}
        self._write_event(caller, f"Shotgun_{entity_type}_Change", entity, RETIREMENT_FIELD,
                          {"type": "attribute_change", "attribute_name": RETIREMENT_FIELD,
                           "entity_type": entity_type, "entity_id": entity_id, "field_data_type": "date_time",
                           "old_value": None, "new_value": when}, project,
                          f"{caller.label} retired {entity_type} {entity_id}")
        self._state.retired[entity_type][entity_id] = when
        self._write_event(caller, f"Shotgun_{entity_type}_Retirement", entity, None,
                          {"type": "entity_retirement", "entity_type": entity_type, "entity_id": entity_id,
                           "id": entity_id, "class_name": entity_type, "display_name": name,
                           "retirement_date": when}, project,
                          f"{caller.label} retired {entity_type} {entity_id}")
        return True

    def _revive(self, params: dict[str, Any], caller: _Caller, api: str = "revive") -> bool:
        entity_type, entity_id = params.get("type"), params.get("id")
        self._fields(entity_type, api)
        row = self._row(entity_type, entity_id, active_only=False)
        if row is None:
            raise SGFault(f"API {api}() {entity_type} {entity_id} does not exist", ERR_NOT_FOUND)
        if not self._is_retired(entity_type, entity_id):
            return False
        when = self._state.retired[entity_type].pop(entity_id)
        project = self._project_of(entity_type, row)
        entity = {"type": entity_type, "id": entity_id}
        self._write_event(caller, f"Shotgun_{entity_type}_Change", entity, RETIREMENT_FIELD,
                          {"type": "attribute_change", "attribute_name": RETIREMENT_FIELD,
                           "entity_type": entity_type, "entity_id": entity_id, "field_data_type": "date_time",
                           "old_value": when, "new_value": None}, project,
                          f"{caller.label} revived {entity_type} {entity_id}")
        self._write_event(caller, f"Shotgun_{entity_type}_Revival", entity, None,
                          {"entity_type": entity_type, "entity_id": entity_id, "id": entity_id,
                           "class_name": entity_type, "display_name": self.display_name(entity_type, row)},
                          project, f"{caller.label} revived {entity_type} {entity_id}")
        return True

    def _batch(self, params: list[dict[str, Any]], caller: _Caller) -> list[Any]:
        """All-or-nothing: on any failure the whole state (rows, ids, events) is rolled back."""
        if not isinstance(params, list):
            raise SGFault("API batch() expects a list of requests")
        snapshot = copy.deepcopy(self._state)
        results: list[Any] = []
        try:
            for req in params:
                kind = req.get("request_type")
                if kind == "create":
                    results.append(self._create(req, caller, "batch"))
                elif kind == "update":
                    results.append(self._update(req, caller, "batch"))
                elif kind == "delete":
                    results.append(self._delete(req, caller, "batch"))
                else:
                    raise SGFault(f"API batch() invalid request_type {kind!r}")
        except Exception:
            self._state = snapshot
            raise
        return results

    # ------------------------------------------------------------------ bidirectional pairs
    def add_pair(self, side: tuple[str, str], other: tuple[str, str]) -> None:
        """Pair two link fields (a custom field created with a reverse field)."""
        with self._lock:
            self._pairs.append((side, other))

    def _reverse(self, entity_type: str, field_name: str, target_type: str) -> str | None:
        """The field of ``target_type`` paired with ``entity_type.field_name`` (both in the schema)."""
        for a, b in self._pairs:
            for (t, f), (ot, of) in ((a, b), (b, a)):
                if (t, f) == (entity_type, field_name) and ot == target_type and f in self.schema.get(t, {}) \
                        and of in self.schema.get(ot, {}):
                    return of
        return None

    def _pair_sync(self, caller: _Caller, entity_type: str, row: dict[str, Any], field_name: str,
                   old: Any, new: Any, ev_id: int | None, in_create: bool = False) -> None:
        """After ``entity_type.field_name`` of ``row`` changed from ``old`` to ``new``: change the other
        side of each pair for the entities unlinked and linked, with SG's backref events."""
        if self._dtype(entity_type, field_name) not in ("entity", "multi_entity"):
            return
        old_l = [x for x in (old if isinstance(old, list) else [old]) if _key(x)]
        new_l = [x for x in (new if isinstance(new, list) else [new]) if _key(x)]
        old_k, new_k = {_key(x) for x in old_l}, {_key(x) for x in new_l}
        trigger = {"name": f"{entity_type}.{field_name}", "orig": ev_id, "type": entity_type, "id": row["id"],
                   "dt": self._dtype(entity_type, field_name), "in_create": in_create}
        me = {"type": entity_type, "id": row["id"]}
        for link in [x for x in old_l if _key(x) not in new_k]:
            self._other_side(caller, entity_type, field_name, link, me, False, trigger)
        for link in [x for x in new_l if _key(x) not in old_k]:
            self._other_side(caller, entity_type, field_name, link, me, True, trigger)

    def _other_side(self, caller: _Caller, entity_type: str, field_name: str, link: dict[str, Any],
                    me: dict[str, Any], adding: bool, trigger: dict[str, Any]) -> None:
        """Add ``me`` to (or remove it from) the paired field of the entity ``link`` names."""
        reverse = self._reverse(entity_type, field_name, link["type"])
        if reverse is None:
            return
        other = self._row(link["type"], link["id"], active_only=False)
        if other is None:
            return
        dt = self._dtype(link["type"], reverse)
        old = other.get(reverse)
        if dt == "multi_entity":
            cur = list(old or [])
            if adding:
                if _key(me) in {_key(x) for x in cur}:
                    return
                new: Any = cur + [dict(me)]
            else:
                if _key(me) not in {_key(x) for x in cur}:
                    return
                new = [x for x in cur if _key(x) != _key(me)]
        else:
            if adding:
                if _key(old) == _key(me):
                    return
                if old is not None:
                    # the other entity moves: the one it linked before loses it on its own side
                    self._other_side(caller, link["type"], reverse, old, {"type": link["type"], "id": link["id"]},
                                     False, trigger)
                new = dict(me)
            else:
                if _key(old) != _key(me):
                    return
                new = None
        other[reverse] = new
        if trigger["orig"] is not None:
            self._change_event(caller, link["type"], other, reverse, dt, old, new, trigger["in_create"],
                               self._backref_extra(trigger["name"], trigger["orig"], trigger["type"], trigger["id"],
                                                   trigger["dt"]))

    def _backref_extra(self, trigger: str, orig: int | None, src_type: str, src_id: int,
                       src_dt: str) -> dict[str, Any]:
        return {"actual_attribute_changed": trigger, "original_event_log_entry_id": orig,
                "entity_type": src_type, "entity_id": src_id, "field_data_type": src_dt}

    # ------------------------------------------------------------------ task templates
    def add_task_template(self, template_id: int, name: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        """Register a TaskTemplate: creating a Shot with ``task_template`` set to it creates these Tasks
        (each dict: ``content`` and optional ``step`` link). Returns the TaskTemplate link."""
        with self._lock:
            self._task_templates[template_id] = (name, [dict(t) for t in tasks])
            if "TaskTemplate" in self.schema:
                table = self._table("TaskTemplate")
                row = self._blank_row("TaskTemplate")
                row["id"] = template_id
                name_field = self._name_field("TaskTemplate")
                if name_field:
                    row[name_field] = name
                table[template_id] = row
                st = self._state
                st.next_id["TaskTemplate"] = max(st.next_id["TaskTemplate"], template_id + 1)
            return {"type": "TaskTemplate", "id": template_id, "name": name}

    def _apply_task_template(self, caller: _Caller, entity_type: str, row: dict[str, Any]) -> None:
        link = row.get("task_template")
        if self._reverse(*TEMPLATE_TASK_FIELD, entity_type) is None or not isinstance(link, dict) \
                or link.get("type") != "TaskTemplate":
            return
        template = self._task_templates.get(link["id"])
        if template is None or "Task" not in self.schema:
            return
        for spec in template[1]:
            fields = [{"field_name": "content", "value": spec.get("content")},
                      {"field_name": "entity", "value": {"type": entity_type, "id": row["id"]}}]
            if spec.get("step") is not None:
                fields.append({"field_name": "step", "value": spec["step"]})
            if row.get("project") is not None and "project" in self.schema["Task"]:
                fields.append({"field_name": "project", "value": row["project"]})
            self._create({"type": "Task", "fields": fields}, caller)

    # ------------------------------------------------------------------ schema methods
    def _schema_read(self, params: Any, caller: _Caller) -> dict[str, Any]:
        return copy.deepcopy(self.schema)

    def _schema_entity_read(self, params: Any, caller: _Caller) -> dict[str, Any]:
        return copy.deepcopy(self.entity_schema)

    def _schema_field_read(self, params: dict[str, Any], caller: _Caller) -> dict[str, Any]:
        entity_type = params.get("type")
        fields = self._fields(entity_type, "schema_field_read")
        name = params.get("field_name")
        if name:
            if name not in fields:
                raise SGFault(f"API schema_field_read() {entity_type}.{name} doesn't exist")
            return {name: copy.deepcopy(fields[name])}
        return copy.deepcopy(fields)

    def _schema_field_create(self, params: dict[str, Any], caller: _Caller) -> str:
        props = {p["property_name"]: p["value"] for p in params.get("properties") or []}
        display = props.get("name") or "field"
        field_name = "sg_" + re.sub(r"[^a-z0-9]+", "_", display.lower()).strip("_")
        self._add_field(params.get("type"), field_name, params.get("data_type"), caller,
                        valid_types=props.get("valid_types"), valid_values=props.get("valid_values"),
                        display_name=display)
        return field_name

    def _schema_field_update(self, params: dict[str, Any], caller: _Caller) -> bool:
        """A field's display name or description (the data type is not changed by this call); no event."""
        fields = self._fields(params.get("type"), "schema_field_update")
        spec = fields.get(params.get("field_name"))
        if spec is None:
            raise SGFault(f"API schema_field_update() {params.get('type')}.{params.get('field_name')} doesn't exist")
        for prop in params.get("properties") or []:
            if prop.get("property_name") in ("name", "description") and prop.get("property_name") in spec:
                spec[prop["property_name"]]["value"] = prop.get("value")
        return True

    def _schema_field_delete(self, params: dict[str, Any], caller: _Caller) -> bool:
        self._remove_field(params.get("type"), params.get("field_name"))
        return True

    def _summarize(self, params: dict[str, Any], caller: _Caller) -> dict[str, Any]:
        """A count of the active rows matching the filters (the one summary the scanner asks for)."""
        if not isinstance(params, dict) or params.get("grouping"):
            raise SGFault("API summarize(): only ungrouped summaries are faked")
        entity_type = params.get("type")
        if not isinstance(entity_type, str):
            raise SGFault("API summarize(): type must be an entity type name")
        self._fields(entity_type)
        pred = self._compile(entity_type, params.get("filters"))
        retired = self._state.retired.get(entity_type, {})
        count = sum(1 for row in self._state.rows.get(entity_type, {}).values()
                    if row["id"] not in retired and pred(row))
        wanted = params.get("summaries") or []
        if not isinstance(wanted, list) or not all(isinstance(w, dict) and w.get("type") == "count"
                                                   and isinstance(w.get("field"), str) for w in wanted):
            raise SGFault("API summarize(): only count summaries of named fields are faked")
        summaries = {w["field"]: count for w in wanted}
        return {"summaries": summaries, "groups": []}

    def _get_session_token(self, params: Any, caller: _Caller) -> dict[str, Any]:
        token = uuidlib.uuid4().hex
        self._sessions[token] = caller
        return {"session_id": token}

    _METHODS: dict[str, Callable[..., Any]] = {
        "read": _read,
        "create": _create,
        "update": _update,
        "delete": _delete,
        "revive": _revive,
        "batch": _batch,
        "summarize": _summarize,
        "schema_read": _schema_read,
        "schema_entity_read": _schema_entity_read,
        "schema_field_read": _schema_field_read,
        "schema_field_create": _schema_field_create,
        "schema_field_update": _schema_field_update,
        "schema_field_delete": _schema_field_delete,
        "get_session_token": _get_session_token,
    }

    # ------------------------------------------------------------------ schema changes (test hooks)
    def add_field(self, entity_type: str, field_name: str, data_type: str, *,
                  valid_types: list[str] | None = None, valid_values: list[str] | None = None,
                  display_name: str | None = None) -> None:
        """Add a field (schema_read reflects it) and write Shotgun_DisplayColumn_New."""
        with self._lock:
            self._add_field(entity_type, field_name, data_type, _SYSTEM, valid_types=valid_types,
                            valid_values=valid_values, display_name=display_name)

    def _add_field(self, entity_type: str, field_name: str, data_type: str, caller: _Caller, **kw: Any) -> None:
        fields = self._fields(entity_type, "schema_field_create")
        if field_name in fields:
            raise SGFault(f"API schema_field_create() {entity_type}.{field_name} already exists")
        fields[field_name] = field_schema(entity_type, field_name, data_type, **kw)
        blank: Any = [] if data_type in ("multi_entity", "tag_list") else (False if data_type == "checkbox" else None)
        for table in (self._state.rows.get(entity_type, {}),):
            for row in table.values():
                row[field_name] = copy.deepcopy(blank)
        self._display_column_id += 1
        dc = {"type": "DisplayColumn", "id": self._display_column_id, "name": field_name}
        self._write_event(caller, "Shotgun_DisplayColumn_New", dc, None,
                          {"type": "new_entity", "entity_type": "DisplayColumn", "entity_id": dc["id"]},
                          None, f"created field {field_name}")

    def change_field_type(self, entity_type: str, field_name: str, data_type: str, *,
                          valid_types: list[str] | None = None, valid_values: list[str] | None = None) -> None:
        """Change a field's data type (values that do not convert become NULL); writes DisplayColumn Changes."""
        with self._lock:
            fields = self._fields(entity_type, "schema_field_update")
            old_spec = fields.get(field_name)
            if old_spec is None:
                raise SGFault(f"{entity_type}.{field_name} doesn't exist")
            old_type = old_spec["data_type"]["value"]
            new_spec = field_schema(entity_type, field_name, data_type, valid_types=valid_types,
                                    valid_values=valid_values, display_name=old_spec["name"]["value"])
            fields[field_name] = new_spec
            for row in self._state.rows.get(entity_type, {}).values():
                row[field_name] = self._convert(row.get(field_name), data_type)
            self._display_column_id += 1
            dc = {"type": "DisplayColumn", "id": self._display_column_id, "name": field_name}
            for attr, old, new in (("data_type", old_type, data_type),
                                   ("properties", old_spec.get("properties"), new_spec["properties"])):
                self._write_event(_SYSTEM, "Shotgun_DisplayColumn_Change", dc, attr,
                                  {"type": "attribute_change", "attribute_name": attr,
                                   "entity_type": "DisplayColumn", "entity_id": dc["id"],
                                   "field_data_type": "text" if attr == "data_type" else "serializable",
                                   "old_value": copy.deepcopy(old), "new_value": copy.deepcopy(new)},
                                  None, f"changed {attr} of field {field_name}")

    @staticmethod
    def _convert(value: Any, data_type: str) -> Any:
        if value is None:
            return [] if data_type in ("multi_entity", "tag_list") else None
        try:
            if data_type in ("number", "duration", "percent", "timecode"):
                return int(value)
            if data_type in ("float", "currency"):
                return float(value)
            if data_type == "text":
                return value if isinstance(value, str) else json.dumps(value)
        except (TypeError, ValueError):
            return None
        return [] if data_type in ("multi_entity", "tag_list") else None

    def remove_field(self, entity_type: str, field_name: str) -> None:
        """Delete a field (no event, as observed on SG)."""
        with self._lock:
            self._remove_field(entity_type, field_name)

    def _remove_field(self, entity_type: str, field_name: str) -> None:
        fields = self._fields(entity_type, "schema_field_delete")
        if field_name not in fields or field_name == "id":
            raise SGFault(f"API schema_field_delete() {entity_type}.{field_name} doesn't exist")
        del fields[field_name]
        for row in self._state.rows.get(entity_type, {}).values():
            row.pop(field_name, None)

    # ------------------------------------------------------------------ event test hooks
    def hold_event_ids(self, n: int) -> list[int]:
        """Reserve the next ``n`` event ids. The next ``n`` events written take them but stay invisible
        until :meth:`release_held` (a late commit) or are discarded by :meth:`drop_held` (a rollback).
        Events written after the reserved ids are used up get higher ids and are visible at once."""
        with self._lock:
            ids = [self._new_id("EventLogEntry") for _ in range(n)]
            self._state.held_reserved.extend(ids)
            return ids

    def release_held(self) -> list[int]:
        """Publish held events (reserved ids never used stay gaps forever). Returns the published ids."""
        with self._lock:
            st = self._state
            table = self._table("EventLogEntry")
            published = sorted(st.held_events)
            for event_id in published:
                table[event_id] = st.held_events.pop(event_id)
            st.held_reserved.clear()
            return published

    def drop_held(self) -> list[int]:
        """Discard held events: their ids never appear. Returns the dropped ids."""
        with self._lock:
            st = self._state
            dropped = sorted(st.held_events)
            st.held_events.clear()
            st.held_reserved.clear()
            return dropped

    def add_noise_events(self, user: dict[str, Any] | None = None) -> list[int]:
        """Write events that change no cacheable data: Toolkit_App_Startup, Shotgun_User_Login,
        Shotgun_Reading_Change, Shotgun_Attachment_View and one with ``meta: None``. Returns their ids."""
        with self._lock:
            caller = _Caller(user=user, label="noise")
            ids = []
            ids.append(self._write_event(caller, "Toolkit_App_Startup", None, None,
                                         {"core": "v0.20.0", "app": "tk-multi-workfiles2", "version": "v1.0.0"}))
            ids.append(self._write_event(caller, "Shotgun_User_Login", user, None, {"type": "login"}))
            ids.append(self._write_event(caller, "Shotgun_Reading_Change", None, "read_by_current_user",
                                         {"type": "attribute_change", "attribute_name": "read_by_current_user",
                                          "entity_type": "Note", "entity_id": 1, "field_data_type": "checkbox",
                                          "old_value": False, "new_value": True}))
            ids.append(self._write_event(caller, "Shotgun_Attachment_View", None, None,
                                         {"type": "view", "link_entity_type": "Attachment", "link_entity_id": 1}))
            ids.append(self._write_event(caller, "Shotgun_Big_Query", None, None, None))
            return [i for i in ids if i is not None]

    # ------------------------------------------------------------------ direct helpers (no HTTP)
    def _direct_caller(self, events: bool) -> _Caller:
        return _Caller(user=None, generate_events=events, label="direct")

    def _direct(self, method: str, params: Any, events: bool) -> Any:
        with self._lock:
            handler = self._METHODS[method]
            return handler(self, to_wire(params), self._direct_caller(events))

    def create_direct(self, entity_type: str, fields: dict[str, Any], return_fields: list[str] | None = None,
                      events: bool = True) -> dict[str, Any]:
        """Create an entity without HTTP/auth (raises SGFault on error). Values may be datetimes."""
        return self._direct("create", {"type": entity_type,
                                       "fields": [{"field_name": k, "value": v} for k, v in fields.items()],
                                       "return_fields": return_fields or ["id"]}, events)

    def update_direct(self, entity_type: str, entity_id: int, fields: dict[str, Any],
                      modes: dict[str, str] | None = None, events: bool = True) -> dict[str, Any]:
        """Update an entity without HTTP; ``modes`` maps multi_entity fields to set/add/remove."""
        items = []
        for k, v in fields.items():
            item: dict[str, Any] = {"field_name": k, "value": v}
            if modes and k in modes:
                item["multi_entity_update_mode"] = modes[k]
            items.append(item)
        return self._direct("update", {"type": entity_type, "id": entity_id, "fields": items}, events)

    def delete_direct(self, entity_type: str, entity_id: int, events: bool = True) -> bool:
        """Retire an entity without HTTP."""
        return self._direct("delete", {"type": entity_type, "id": entity_id}, events)

    def revive_direct(self, entity_type: str, entity_id: int, events: bool = True) -> bool:
        """Revive an entity without HTTP."""
        return self._direct("revive", {"type": entity_type, "id": entity_id}, events)

    def find_direct(self, entity_type: str, filters: Any = None, fields: Iterable[str] | None = None,
                    order: list[dict[str, Any]] | None = None, filter_operator: str = "all",
                    retired_only: bool = False, include_archived_projects: bool = True) -> list[dict[str, Any]]:
        """Read without HTTP; ``filters`` in python list form or wire dict form. Returns every match."""
        params: dict[str, Any] = {
            "type": entity_type, "return_fields": list(fields or ["id"]),
            "filters": wire_filters(filters or [], filter_operator),
            "return_only": "retired" if retired_only else "active",
            "paging": {"entities_per_page": 10**9, "current_page": 1},
            "sorts": [{"field_name": o.get("field_name") or o.get("column"),
                       "direction": o.get("direction", "asc")} for o in order or []],
        }
        if not include_archived_projects:
            params["include_archived_projects"] = False
        return self._direct("read", params, False)["entities"]

    def events(self, since_id: int = 0) -> list[dict[str, Any]]:
        """Visible EventLogEntry rows (stored form) with id > since_id, in id order."""
        with self._lock:
            table = self._state.rows.get("EventLogEntry", {})
            return [copy.deepcopy(table[i]) for i in sorted(table) if i > since_id]

    def last_event_id(self) -> int:
        """Highest visible event id (0 if none)."""
        with self._lock:
            return max(self._state.rows.get("EventLogEntry", {}) or [0])

    def reset(self) -> None:
        """Drop all data (keeps schema and credentials; their ApiUser/HumanUser rows are re-created)."""
        with self._lock:
            self._state = _State()
            for t in self.schema:
                self._table(t)
            for script in self._scripts.values():
                row = self._insert_row("ApiUser", {"firstname": script.name,
                                                   "generate_event_log_entries": script.generate_events})
                script.api_user_id = row["id"]
            for login, (password, _old) in list(self._humans.items()):
                row = self._insert_row("HumanUser", {"login": login})
                self._humans[login] = (password, row["id"])
            self._sessions.clear()
            self._task_templates.clear()
            self.reset_counts()
