"""Relative-date filters (``in_last``, ``in_next``, ``in_calendar_*`` and their negations) as
windows of SG's stored values, in one time zone (``sgcache_timezone``), at one instant.

The rule (docs/semantics.md, "Relative dates"):

- ``in_last [n, unit]`` is the window from *now shifted back n units* to *now*; ``in_next`` from
  now to now shifted forward; both ends included. HOUR shifts the instant by n hours; DAY, WEEK,
  MONTH and YEAR shift the local wall-clock time in the zone (a month's last day when the day does
  not exist), so "last 1 DAY" across a DST change is 23 or 25 hours.
- ``in_calendar_<unit> [k]`` is the local calendar period k periods from the current one (0: this
  one, -1: the previous), from its first local midnight included to the next period's excluded.
  Weeks start on Monday.
- A local time the zone skips (spring forward) is the instant the clocks jump; one the zone
  repeats (fall back) is its first occurrence.
- ``date`` fields compare their day with the local days of the window's ends.
- ``not_in_*``: a value outside the window; an empty value is in neither.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import Passthrough
from ..wire import parse_wire_dt

RELATIVE = frozenset({"in_last", "not_in_last", "in_next", "not_in_next",
                      "in_calendar_day", "in_calendar_week", "in_calendar_month", "in_calendar_year"})
UNITS = ("HOUR", "DAY", "WEEK", "MONTH", "YEAR")


def zone_named(name: str) -> ZoneInfo:
    """The IANA zone ``name``; ValueError naming it when it is not known."""
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name, e.g. Europe/London)") from exc


def system_now() -> datetime:
    return datetime.now(UTC)


def fixed_clock(text: str) -> Callable[[], datetime]:
    """A clock stopped at ``text`` (ISO 8601; naive means UTC); ValueError when unreadable."""
    when = parse_wire_dt(text.strip()) or datetime.fromisoformat(text.strip())
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    stopped = when.astimezone(UTC)
    return lambda: stopped


@dataclass(frozen=True)
class Window:
    """The values a relative filter keeps, as stored strings: ``lo <= v`` and ``v < hi`` (or
    ``v <= hi`` when ``hi_included``); ``negate``: the values outside it (never empty ones)."""

    lo: str
    hi: str
    hi_included: bool
    negate: bool


@dataclass(frozen=True)
class RelativeDates:
    """Relative-date windows in ``zone`` at the time ``clock`` gives (aware, any zone)."""

    zone: ZoneInfo
    clock: Callable[[], datetime] = system_now

    def window(self, relation: str, values: list[Any], data_type: str) -> Window:
        """The window of ``relation`` with ``values`` on a ``date`` or ``date_time`` field, or
        Passthrough (``filter-value``) for values whose shape SG's answer is not known for."""
        now = self.clock().astimezone(UTC).replace(microsecond=0)
        local = now.astimezone(self.zone).replace(tzinfo=None)
        if relation.startswith("in_calendar_"):
            if len(values) != 1 or type(values[0]) is not int:
                raise Passthrough("filter-value", f"{relation} {values!r}"[:60])
            start, end = _period(local, relation.rsplit("_", 1)[1], values[0])
            if data_type == "date":
                return Window(start.date().isoformat(), end.date().isoformat(), False, False)
            return Window(_stored(self._instant(start)), _stored(self._instant(end)), False, False)
        if len(values) != 2 or type(values[0]) is not int or values[0] < 0 or values[1] not in UNITS:
            raise Passthrough("filter-value", f"{relation} {values!r}"[:60])
        n, unit = values
        sign = -1 if relation.endswith("_last") else 1
        if unit == "HOUR":
            other = now + timedelta(hours=sign * n)
            other_local = other.astimezone(self.zone).replace(tzinfo=None)
        else:
            other_local = shift(local, sign * n, unit)
            other = self._instant(other_local)
        negate = relation.startswith("not_")
        if data_type == "date":
            ends = sorted([local.date(), other_local.date()])
            return Window(ends[0].isoformat(), ends[1].isoformat(), True, negate)
        ends_at = sorted([now, other])
        return Window(_stored(ends_at[0]), _stored(ends_at[1]), True, negate)

    def _instant(self, wall: datetime) -> datetime:
        """The instant the zone's clocks read ``wall`` (its first occurrence; a skipped time: the
        instant of the jump)."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        if first.astimezone(self.zone).replace(tzinfo=None) == wall:
            return first
        # skipped: fold=0 reads it with the offset before the jump, which lands after the jump;
        # the jump is the first instant from which the local clock reads later than ``wall``
        lo, hi = first - timedelta(days=1), first
        while hi - lo > timedelta(seconds=1):
            mid = lo + (hi - lo) / 2
            if mid.astimezone(self.zone).replace(tzinfo=None) > wall:
                hi = mid
            else:
                lo = mid
        return hi.replace(microsecond=0)


def shift(wall: datetime, n: int, unit: str) -> datetime:
    """``wall`` moved by ``n`` calendar units (DAY, WEEK, MONTH, YEAR) on the wall clock."""
    if unit == "DAY":
        return wall + timedelta(days=n)
    if unit == "WEEK":
        return wall + timedelta(weeks=n)
    months = n * 12 if unit == "YEAR" else n
    year, month0 = divmod(wall.year * 12 + wall.month - 1 + months, 12)
    day = min(wall.day, calendar.monthrange(year, month0 + 1)[1])
    return wall.replace(year=year, month=month0 + 1, day=day)


def _period(local: datetime, unit: str, k: int) -> tuple[datetime, datetime]:
    """The local start of the calendar ``unit`` k periods from the one holding ``local``, and the next's."""
    today = local.date()
    if unit == "day":
        start = today + timedelta(days=k)
        end = start + timedelta(days=1)
    elif unit == "week":
        start = today - timedelta(days=today.weekday()) + timedelta(weeks=k)
        end = start + timedelta(weeks=1)
    elif unit == "month":
        first = datetime(today.year, today.month, 1)
        start, end = shift(first, k, "MONTH").date(), shift(first, k + 1, "MONTH").date()
    else:
        start, end = date(today.year + k, 1, 1), date(today.year + k + 1, 1, 1)
    return datetime.combine(start, datetime.min.time()), datetime.combine(end, datetime.min.time())


def _stored(instant: datetime) -> str:
    """An instant as a date_time is stored (SG's wire form, UTC)."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
