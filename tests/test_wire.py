"""SG wire-format helpers (cache/wire.py): one reading of datetimes and links for every module."""

from __future__ import annotations

import datetime as dt

import pytest

from cache.wire import (
    check_link,
    chunks,
    format_wire_dt,
    is_link,
    link_key,
    links_in,
    parse_when,
    parse_wire_dt,
    to_wire,
)

PARIS = dt.timezone(dt.timedelta(hours=2))


def test_format_and_to_wire_give_sg_strings_in_utc() -> None:
    assert format_wire_dt(dt.datetime(2026, 3, 1, 14, 0, 5, tzinfo=PARIS)) == "2026-03-01T12:00:05Z"
    assert format_wire_dt(dt.datetime(2026, 3, 1, 12, 0, 5)) == "2026-03-01T12:00:05Z"  # naive is UTC
    value = {"at": dt.datetime(2026, 3, 1, 14, 0, tzinfo=PARIS), "on": dt.date(2026, 3, 1),
             "list": [dt.datetime(2026, 1, 1), ("x", 1)], "n": 3}
    assert to_wire(value) == {"at": "2026-03-01T12:00:00Z", "on": "2026-03-01",
                              "list": ["2026-01-01T00:00:00Z", ["x", 1]], "n": 3}


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-03-01T12:00:05Z", dt.datetime(2026, 3, 1, 12, 0, 5)),
    ("2026-03-01T14:00:05+02:00", dt.datetime(2026, 3, 1, 12, 0, 5)),
    ("2026-03-01T12:00:05.250000Z", dt.datetime(2026, 3, 1, 12, 0, 5, 250000)),  # a heartbeat stamp
    ("2026-03-01", dt.datetime(2026, 3, 1)),
    (dt.datetime(2026, 3, 1, 14, 0, tzinfo=PARIS), dt.datetime(2026, 3, 1, 12, 0)),
    (dt.datetime(2026, 3, 1, 12, 0), dt.datetime(2026, 3, 1, 12, 0)),
    ("yesterday", None), ("", None), (None, None), (1700000000, None),
])
def test_parse_wire_dt_is_lenient_and_naive_utc(value: object, expected: dt.datetime | None) -> None:
    """A value from SG or the state table: never raises, None when it is no datetime."""
    assert parse_wire_dt(value) == expected


def test_parse_when_is_strict_and_aware_utc() -> None:
    """What a person typed (``scan --since``): spaces and a lower-case ``z`` are fine, nonsense is an error."""
    assert parse_when(" 2026-03-01T12:00:00z ") == dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
    assert parse_when("2026-03-01T14:00:00+02:00") == dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
    with pytest.raises(ValueError):
        parse_when("yesterday")


def test_links() -> None:
    shot = {"type": "Shot", "id": 3, "name": "sh010"}
    assert is_link(shot) and link_key(shot) == ("Shot", 3)
    for bad in ({"type": "Shot", "id": True}, {"type": "Shot", "id": "3"}, {"id": 3}, ["Shot", 3], None):
        assert not is_link(bad) and link_key(bad) is None
        with pytest.raises(ValueError, match="not an entity link"):
            check_link(bad)
    check_link(shot)
    assert links_in(shot) == [shot] and links_in(shot)[0] is not shot  # copies
    assert links_in([shot, {"type": "Asset", "id": False}, None, {"type": "Asset", "id": 1}]) == [
        shot, {"type": "Asset", "id": 1}]
    assert links_in(None) == [] and links_in("Shot") == []


def test_chunks() -> None:
    assert list(chunks([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]
    assert list(chunks([], 500)) == []
