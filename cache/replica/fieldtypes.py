"""SG data types: how each is stored, encoded and filtered, or why it is not cached.

This is the one place that says which data types the replica holds.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..wire import WIRE_DT, format_wire_dt

#: Data types never cached, with the reason a read naming them passes through.
UNCACHED_TYPES: dict[str, str] = {
    "image": "image-url",  # SG answers with signed URLs that expire; a stored one goes stale
    "password": "password",  # SG masks it; nothing to serve
    "pivot_column": "pivot-column",  # UI-only, not usable through the API
    "summary": "summary-field",  # computed by SG from other rows
    "query": "query-field",
    "calculated": "calculated-field",
    "system_task_type": "unknown-type",
}

#: Types whose sort key is the lower-cased text (the rule the fake SG shares; docs/semantics.md).
LOWER_SORTED = frozenset({"text", "entity_type", "color", "uuid", "list", "status_list", "footage"})

_TEXT_OPS = frozenset(
    {"is", "is_not", "in", "not_in", "contains", "not_contains", "starts_with", "ends_with"}
)
# SG's reference ("Valid Operators By Data Type", shotgun_api3's docs/reference.rst) gives
# not_between to number and currency only, name_is to entity only, name_starts_with and
# name_ends_with to neither link type: what it does not list passes (SG answers, or refuses).
_ORDER_OPS = frozenset({"is", "is_not", "in", "not_in", "less_than", "greater_than", "between"})
_NUMBER_OPS = _ORDER_OPS | {"not_between"}
_DATE_OPS = _ORDER_OPS | {
    "in_last",
    "not_in_last",
    "in_next",
    "not_in_next",
    "in_calendar_day",
    "in_calendar_week",
    "in_calendar_month",
    "in_calendar_year",
}
_MULTI_ENTITY_OPS = frozenset({"is", "is_not", "in", "not_in", "type_is", "type_is_not", "name_contains",
                               "name_not_contains"})
_ENTITY_OPS = _MULTI_ENTITY_OPS | {"name_is"}


@dataclass(frozen=True)
class TypeInfo:
    """How one SG data type lives in the replica."""

    storage: str  # "text", "int", "float", "bool", "json", "entity", "multi"
    operators: frozenset[str]
    sortable: bool = True


TYPES: dict[str, TypeInfo] = {
    "text": TypeInfo("text", _TEXT_OPS),
    "entity_type": TypeInfo("text", frozenset({"is", "is_not", "in", "not_in"})),
    "color": TypeInfo("text", frozenset({"is", "is_not", "in", "not_in"})),
    "uuid": TypeInfo("text", frozenset({"is", "is_not", "in", "not_in"})),
    "list": TypeInfo("text", frozenset({"is", "is_not", "in", "not_in"})),
    "status_list": TypeInfo("text", frozenset({"is", "is_not", "in", "not_in"})),
    "footage": TypeInfo("text", frozenset({"is", "is_not", "in", "not_in"})),
    "number": TypeInfo("int", _NUMBER_OPS),
    "currency": TypeInfo("float", _NUMBER_OPS),
    "percent": TypeInfo("int", _ORDER_OPS),
    "duration": TypeInfo("int", _ORDER_OPS),
    "timecode": TypeInfo("int", _ORDER_OPS),
    "float": TypeInfo("float", _ORDER_OPS),
    "checkbox": TypeInfo("bool", frozenset({"is", "is_not"})),
    # Dates are kept in SG's own wire form; both forms sort as text.
    "date": TypeInfo("text", _DATE_OPS),
    "date_time": TypeInfo("text", _DATE_OPS),
    "serializable": TypeInfo("json", frozenset(), sortable=False),
    "url": TypeInfo("json", frozenset(), sortable=False),
    "tag_list": TypeInfo("json", frozenset(), sortable=False),
    "entity": TypeInfo("entity", _ENTITY_OPS),
    "multi_entity": TypeInfo("multi", _MULTI_ENTITY_OPS, sortable=False),
    "addressing": TypeInfo("multi", frozenset(), sortable=False),
}


def uncached_reason(data_type: str) -> str | None:
    """Why a field of this data type is not cached, or None when it is."""
    if data_type in TYPES:
        return None
    return UNCACHED_TYPES.get(data_type, "unknown-data-type")


def is_cached_type(data_type: str) -> bool:
    return data_type in TYPES


#: SG's wire form of a datetime, and the form its event log writes one in (``2015-07-13 21:54:01 UTC``).
_WIRE_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_EVENT_DATE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}) UTC")


def _wire_date_time(text: str) -> str:
    """A date_time string as SG's API sends it; an event log entry's form is rewritten to it (stored
    as it came, it was served as a plain string and compared as text with the API's form)."""
    if _WIRE_DATE_TIME.fullmatch(text):
        wire = text
    else:
        match = _EVENT_DATE_TIME.fullmatch(text)
        if match is None:
            raise ValueError(f"date_time value not in SG's form: {text[:40]!r}")
        wire = f"{match[1]}T{match[2]}Z"
    datetime.datetime.strptime(wire, WIRE_DT)  # a real time (ValueError for 2015-02-30 or 25:61)
    return wire


def encode_scalar(data_type: str, value: Any) -> Any:
    """JSON value from SG -> column value. Raises ValueError on a value of the wrong shape."""
    if value is None:
        return None
    storage = TYPES[data_type].storage
    if data_type == "date_time":
        if isinstance(value, datetime.datetime):
            # shotgun_api3 hands back datetimes (aware local, or naive UTC); store SG's wire form
            return format_wire_dt(value)
        if isinstance(value, str):
            return _wire_date_time(value)
    if data_type == "date" and isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value.isoformat()
    if storage == "text":
        if not isinstance(value, str):
            raise ValueError(f"{data_type} value must be a string, got {type(value).__name__}")
        return value
    if storage == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{data_type} value must be an integer")
        return value
    if storage == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{data_type} value must be a number")
        # JSON's 1e400 decodes as infinity, a 400-digit integer overflows a double: SG's values are
        # finite doubles, and what SG makes of another is not known (a read of it passes)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"{data_type} value must be a finite double")
        return number
    if storage == "bool":
        if not isinstance(value, bool):
            raise ValueError("checkbox value must be a boolean")
        return value
    if storage == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)
    raise ValueError(f"{data_type} is not a scalar type")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} in the replica: not JSON")


def _json_or_none(value: Any) -> Any:
    return None if value is None else json.loads(value, parse_constant=_not_json)


def _bool_or_false(value: Any) -> Any:
    return bool(value) if value is not None else False


def _float_or_none(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):  # PostgreSQL keeps NaN and infinities; SG's JSON has none
        raise ValueError(f"{value} in the replica: not JSON")
    return value


def _int_or_none(value: Any) -> Any:
    return None if value is None else int(value)


#: Per storage: how a column value decodes (no entry: as it is).
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "json": _json_or_none, "bool": _bool_or_false, "float": _float_or_none, "int": _int_or_none,
}


def scalar_decoder(data_type: str) -> Callable[[Any], Any] | None:
    """:func:`decode_scalar` for one data type, as a function of the value (None: the value as it is)."""
    return _DECODERS.get(TYPES[data_type].storage)


def decode_scalar(data_type: str, value: Any) -> Any:
    """Column value -> the JSON value SG sends."""
    convert = scalar_decoder(data_type)
    return value if convert is None else convert(value)
