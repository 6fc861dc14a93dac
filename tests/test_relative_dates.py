"""Relative-date filters (``sgcache_timezone``): the proxy's answers equal the fake SG's.

The two sides share no code: the cache turns each filter into a range of stored values
(cache/read/relative.py), the fake SG tests each value (tests/fakesg/relative.py). The unit part
compares them for every operator and unit at instants around day boundaries and DST changes in
several zones; the end-to-end part runs two proxies (UTC and America/New_York, their clocks stopped
at the fake site's) and checks each answer is a hit equal to the fake's.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cache.errors import Passthrough
from cache.read.relative import RelativeDates, Window, fixed_clock, zone_named
from tests.fakesg.site import _shift, parse_date, parse_dt

from .fakesg import FakeSite
from .fakesg.relative import relative_predicate
from .rig import KEY, SCRIPT, Rig

UNITS = ("HOUR", "DAY", "WEEK", "MONTH", "YEAR")
SPANS = ("in_last", "not_in_last", "in_next", "not_in_next")
CALENDAR = ("in_calendar_day", "in_calendar_week", "in_calendar_month", "in_calendar_year")
#: 03:30 UTC on the day New York springs forward (07:00 UTC): 22:30 of the day before there, a
#: Saturday (the week differs from UTC's Sunday), and "next 1 DAY" there is 23 hours.
T1 = datetime(2026, 3, 8, 3, 30, tzinfo=UTC)
#: (zone, instant): day boundaries, both DST changes, a skipped local time as a window's end
#: (02:30 the day after New York springs forward), the repeated hour in London, a month's end.
INSTANTS = [
    ("UTC", T1), ("America/New_York", T1),
    ("America/New_York", datetime(2026, 3, 9, 6, 30, tzinfo=UTC)),
    ("America/New_York", datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
    ("Europe/London", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
    ("Europe/London", datetime(2026, 3, 29, 23, 59, 59, tzinfo=UTC)),
    ("Australia/Sydney", datetime(2026, 3, 31, 13, 0, tzinfo=UTC)),
    ("Asia/Kolkata", datetime(2026, 12, 31, 18, 45, tzinfo=UTC)),
]


def filters(counts: tuple[int, ...] = (1, 2)) -> list[tuple[str, list[Any]]]:
    """Every operator and unit, ``counts`` of each unit, calendar offsets -1, 0 and 1."""
    out = [(op, [n, unit]) for op in SPANS for unit in UNITS for n in counts]
    return out + [(op, [k]) for op in CALENDAR for k in (-1, 0, 1)]


def values_around(now: datetime) -> tuple[list[str], list[str]]:
    """date_time values every 50 minutes for 2 days each side, then every 97 hours for 400 days;
    date values every day for 16 days each side, then every week for 400 days."""
    stamps = {now + timedelta(minutes=50 * i) for i in range(-58, 59)}
    stamps |= {now + timedelta(hours=97 * i) for i in range(-100, 101)}
    days = {now.date() + timedelta(days=i) for i in range(-16, 17)}
    days |= {now.date() + timedelta(days=7 * i) for i in range(-58, 59)}
    return sorted(s.strftime("%Y-%m-%dT%H:%M:%SZ") for s in stamps), sorted(d.isoformat() for d in days)


def kept(window: Window, value: str) -> bool:
    """What the replica's SQL keeps (stored text compared as text)."""
    inside = window.lo <= value and (value <= window.hi if window.hi_included else value < window.hi)
    return not inside if window.negate else inside


@pytest.mark.parametrize(("zone", "now"), INSTANTS, ids=[f"{z}@{t:%Y-%m-%dT%H:%M}" for z, t in INSTANTS])
def test_windows_equal_the_fake_sites(zone: str, now: datetime) -> None:
    engine = RelativeDates(zone_named(zone), fixed_clock(now.isoformat()))
    stamps, days = values_around(now)
    for relation, vals in filters():
        for data_type, values in (("date_time", stamps), ("date", days)):
            window = engine.window(relation, vals, data_type)
            fake = relative_predicate(now, ZoneInfo(zone), data_type, relation, vals, _shift, parse_dt, parse_date)
            assert fake is not None
            for value in [*values, window.lo, window.hi]:  # and the exact ends
                assert kept(window, value) == fake(value), (relation, vals, data_type, value, window)


def test_the_rule_in_numbers() -> None:
    """The documented choices, once each (docs/semantics.md, "Relative dates")."""
    ny = RelativeDates(zone_named("America/New_York"), fixed_clock("2026-03-08T03:30:00Z"))
    # DAY moves the wall clock: 22:30 to 22:30 the next day, 23 hours across the change
    assert ny.window("in_next", [1, "DAY"], "date_time") == Window(
        "2026-03-08T03:30:00Z", "2026-03-09T02:30:00Z", True, False)
    assert ny.window("in_next", [24, "HOUR"], "date_time").hi == "2026-03-09T03:30:00Z"
    # Monday-first weeks in the site's zone: Saturday March 7th belongs to the week of March 2nd
    assert ny.window("in_calendar_week", [0], "date") == Window("2026-03-02", "2026-03-09", False, False)
    # a skipped local time (02:30 on March 8th) as a window's end is the instant of the jump
    after = RelativeDates(zone_named("America/New_York"), fixed_clock("2026-03-09T06:30:00Z"))
    assert after.window("in_last", [1, "DAY"], "date_time").lo == "2026-03-08T07:00:00Z"
    # months keep the day, or take the month's last
    eom = RelativeDates(zone_named("UTC"), fixed_clock("2026-03-31T12:00:00Z"))
    assert eom.window("in_last", [1, "MONTH"], "date").lo == "2026-02-28"
    for bad in ([1, "day"], [1], ["1", "DAY"], [True, "DAY"], [-1, "DAY"]):
        with pytest.raises(Passthrough):
            ny.window("in_last", bad, "date_time")
    with pytest.raises(ValueError, match="unknown time zone"):
        zone_named("Mars/Olympus")


# ---------------------------------------------------------------------------------- end to end
ZONES = ("UTC", "America/New_York")
RULES = "+Project.*\n+Shot.*\n-*.image\n"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    site.set_clock(T1)
    project = site.create_direct("Project", {"name": "dates"})
    stamps, days = values_around(T1)
    for i, stamp in enumerate(stamps):
        site.create_direct("Shot", {"code": f"s{i}", "project": {"type": "Project", "id": project["id"]},
                                    "sg_last_review": stamp, "sg_due_date": days[(i * 5) % len(days)]})
    site.create_direct("Shot", {"code": "empty", "project": {"type": "Project", "id": project["id"]}})
    options = ["sgcache_max_lag=0", f"sgcache_clock={T1.isoformat()}"]
    with Rig(tmp_path_factory.mktemp("reldates"), module_db_url, site, rules=RULES,
             proxy=[*options, f"sgcache_timezone={ZONES[0]}"]) as rig:
        rig.start_proxy([*options, f"sgcache_timezone={ZONES[1]}"])
        yield rig


@pytest.mark.parametrize("zone", ZONES)
def test_proxied_answers_equal_the_fake_sites(rig: Rig, zone: str) -> None:
    proxy = rig.proxies[ZONES.index(zone)]
    sg, direct = rig.client(proxy), rig.direct()
    sg.find_one("Project", [])  # new credentials pass once; SG accepting them enables hits
    rig.site.timezone = zone
    seen = 0
    for relation, vals in filters((1,)):  # the unit test above covers more counts
        for path in ("sg_last_review", "sg_due_date"):
            query = [[path, relation, *vals]]
            expected = direct.find("Shot", query, ["code"], order=[{"field_name": "id", "direction": "asc"}])
            before = rig.reads()
            got = sg.find("Shot", query, ["code"], order=[{"field_name": "id", "direction": "asc"}])
            assert got == expected, (zone, query)
            assert rig.reads() == before, f"not a hit: {query}"
            seen += bool(expected)
    assert seen > len(filters((1,)))  # most filters keep some rows: the comparison is not of empty lists


def test_value_grid_spans_the_windows() -> None:
    """The grid reaches past a year each side (YEAR windows have values outside them)."""
    stamps, days = values_around(T1)
    assert stamps[0] < "2025-03-01" and stamps[-1] > "2027-03-01"
    assert date.fromisoformat(days[0]) < date(2025, 3, 8) < date(2027, 3, 8) < date.fromisoformat(days[-1])
