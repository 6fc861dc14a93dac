"""SG's wire format in one place: datetimes, entity links, and id lists cut to size.

The ingester, the scanner, the store and the proxy's write path all read SG's JSON; they use
these helpers so that a datetime or a link means the same thing everywhere.

- Datetimes: SG sends ``YYYY-MM-DDTHH:MM:SSZ`` (UTC); shotgun_api3 hands back ``datetime``
  objects (aware local time, or naive UTC). :func:`format_wire_dt` and :func:`to_wire` turn
  them back into SG's strings; :func:`parse_wire_dt` reads a value from SG leniently (None
  when it cannot), :func:`parse_when` reads a date a person typed strictly (ValueError).
- Links: ``{"type": str, "id": int}`` (a bool is no id). :func:`is_link` tests one,
  :func:`check_link` refuses a bad one, :func:`links_in` keeps the good ones of a value.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: The entity type of SG's event log (read by the ingester, answered by the read engine).
EVENT_TYPE = "EventLogEntry"

#: SG's datetime wire form (always UTC).
WIRE_DT = "%Y-%m-%dT%H:%M:%SZ"

Key = tuple[str, int]


# -- datetimes -------------------------------------------------------------------------
def naive_utc(value: dt.datetime) -> dt.datetime:
    """An aware datetime as naive UTC; a naive one is taken to be UTC already."""
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def format_wire_dt(value: dt.datetime) -> str:
    """A datetime in SG's wire form (``YYYY-MM-DDTHH:MM:SSZ``, UTC)."""
    return naive_utc(value).isoformat(timespec="seconds") + "Z"  # WIRE_DT; strftime costs 3x as much


#: Types :func:`to_wire` returns as they are, checked by exact type before any call: most of an
#: event's or a row's values (the ingester converts every one it reads).
_AS_IS = frozenset({str, int, float, bool, type(None)})


def to_wire(value: Any) -> Any:
    """Datetimes/dates that shotgun_api3 decoded, back into SG's wire strings (recursively)."""
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in _AS_IS else to_wire(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [v if type(v) in _AS_IS else to_wire(v) for v in value]
    if kind in _AS_IS:
        return value
    if isinstance(value, dt.datetime):
        return format_wire_dt(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value


def parse_wire_dt(value: Any) -> dt.datetime | None:
    """A datetime from SG (wire string, other ISO 8601 string, or object) as naive UTC;
    None if absent or unparsable (a value from SG never raises)."""
    if isinstance(value, dt.datetime):
        return naive_utc(value)
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.strptime(value, WIRE_DT)
    except ValueError:
        try:
            return naive_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None


def parse_when(text: str) -> dt.datetime:
    """An ISO 8601 date or datetime a person gave (``--since``) as aware UTC: naive means UTC,
    ``Z``/``z`` accepted, spaces around ignored; ValueError when it is not one."""
    value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def iso_now() -> str:
    """Now as ISO UTC with microseconds (the stamp of ``ingester_leader``)."""
    return wire_from_epoch(time.time())


def wire_from_epoch(seconds: float) -> str:
    """Seconds since the epoch as ISO UTC with microseconds (the stamp of ``ingester_heartbeat``)."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seconds_since(stamp: Any, now: float) -> float | None:
    """Seconds from a wire-form UTC time to ``now`` (seconds since the epoch, on the clock that
    stamped it); None when missing or unreadable."""
    when = parse_wire_dt(stamp) if isinstance(stamp, str) else None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, now - when.timestamp())


# -- links -----------------------------------------------------------------------------
def is_link(value: Any) -> bool:
    """Whether ``value`` is an entity link: a mapping with a str ``type`` and an int ``id``."""
    return (isinstance(value, Mapping) and isinstance(value.get("type"), str)
            and isinstance(value.get("id"), int) and not isinstance(value.get("id"), bool))


def link_key(value: Any) -> Key | None:
    """``(type, id)`` of a link; None when ``value`` is not one."""
    return (value["type"], int(value["id"])) if is_link(value) else None


def check_link(value: Any) -> None:
    """Raise ValueError unless ``value`` is an entity link."""
    if not is_link(value):
        raise ValueError(f"not an entity link: {value!r}")


def links_in(value: Any) -> list[dict[str, Any]]:
    """The links of an entity value (one link) or a multi_entity value (a list), as plain dicts;
    anything that is not a link is left out."""
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        return []
    return [dict(x) for x in value if is_link(x)]


def row_links(record: Mapping[str, Any]) -> set[Key]:
    """``(type, id)`` of every entity a row (SG's, a read's) links through any of its fields."""
    return {(link["type"], int(link["id"])) for name, value in record.items() if name not in ("type", "id")
            for link in links_in(value)}


# -- id lists --------------------------------------------------------------------------
def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """``items`` in slices of at most ``size``: ``id in [...]`` lists sent to SG or the database."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
