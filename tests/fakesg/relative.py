"""The fake site's relative-date filters, in its own time zone (``FakeSite.timezone``).

Written apart from the cache's cache/read/relative.py on purpose: the tests compare the two.
Here each window's ends are local wall-clock times turned into instants by trying the zone's
offsets around them (a skipped time: scanning minute by minute to the jump); values are compared
as instants (date_time) or as days (date).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo


def local_to_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The first instant at which the zone's clocks read ``wall`` (naive); for a time the zone
    skips, the instant of the jump."""
    offsets = {zone.utcoffset(wall + timedelta(hours=h)) for h in (-36, -12, 0, 12, 36)}
    readings = sorted(wall - off for off in offsets if off is not None)
    for candidate in readings:
        if candidate.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None) == wall:
            return candidate.replace(tzinfo=UTC)
    t = readings[0].replace(tzinfo=UTC)
    while t.astimezone(zone).replace(tzinfo=None) <= wall:
        t += timedelta(minutes=1)
    return t


def calendar_bounds(today: date, unit: str, k: int, shift: Callable[[datetime, int, str], datetime]) -> tuple[date, date]:
    """First local day of the calendar ``unit`` k periods from today's, and of the one after."""
    if unit == "day":
        return today + timedelta(days=k), today + timedelta(days=k + 1)
    if unit == "week":  # Monday first
        monday = date.fromordinal(today.toordinal() - today.isoweekday() + 1)
        return monday + timedelta(days=7 * k), monday + timedelta(days=7 * k + 7)
    if unit == "month":
        first = datetime(today.year, today.month, 1)
        return shift(first, k, "MONTH").date(), shift(first, k + 1, "MONTH").date()
    return date(today.year + k, 1, 1), date(today.year + k + 1, 1, 1)


def relative_predicate(now: datetime, zone: ZoneInfo, dt: str, relation: str, values: list[Any],
                       shift: Callable[[datetime, int, str], datetime],
                       parse_dt: Callable[[Any], datetime | None],
                       parse_date: Callable[[Any], date | None]) -> Callable[[Any], bool] | None:
    """The predicate of a relative filter, or None when ``values`` do not fit ``relation``."""
    local = now.astimezone(zone).replace(tzinfo=None)
    if relation.startswith("in_calendar_"):
        if len(values) != 1 or not isinstance(values[0], int):
            return None
        first, after = calendar_bounds(local.date(), relation.rsplit("_", 1)[1], values[0], shift)
        if dt == "date":
            return lambda v: (d := parse_date(v)) is not None and first <= d < after
        start = local_to_instant(datetime(first.year, first.month, first.day), zone)
        end = local_to_instant(datetime(after.year, after.month, after.day), zone)
        return lambda v: (d := parse_dt(v)) is not None and start <= d < end
    if len(values) != 2 or not isinstance(values[0], int) or not isinstance(values[1], str):
        return None
    n, unit = values[0], values[1].upper()
    n = -n if relation.endswith("last") else n
    if unit == "HOUR":
        other = now + timedelta(hours=n)
        other_local = other.astimezone(zone).replace(tzinfo=None)
    else:
        other_local = shift(local, n, unit)
        other = local_to_instant(other_local, zone)
    if dt == "date":
        lo_d, hi_d = min(local.date(), other_local.date()), max(local.date(), other_local.date())

        def inside(v: Any) -> bool:
            d = parse_date(v)
            return d is not None and lo_d <= d <= hi_d
    else:
        lo, hi = min(now, other), max(now, other)

        def inside(v: Any) -> bool:
            d = parse_dt(v)
            return d is not None and lo <= d <= hi
    if relation.startswith("not_"):
        return lambda v: v is not None and not inside(v)
    return inside
