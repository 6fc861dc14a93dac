"""A NUL character in one client's request, end to end: PostgreSQL refuses NUL in text, SQLite
stops text at it. The request with it goes to SG (or is learnt as far as the replica can take it);
the other clients keep their hits and the database breaker stays closed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .rig import Rig

#: Reads a client could send with a NUL in a filter value.
NUL_FILTERS: list[list[Any]] = [
    [["code", "is", "sh010\x00x"]],
    [["code", "contains", "sh010\x00zzz"]],  # SQLite's LIKE would read '%sh010': sh010 matches
    [["code", "ends_with", "0\x00zzz"]],
    [["code", "starts_with", "sh\x00"]],
    [["code", "in", ["sh010\x00", "nothing"]]],
    [["code", "in", [f"sh{i:03d}\x00" for i in range(40)]]],  # a long in list: one bound parameter
    [["sg_sequence.Sequence.code", "is", "SQ01\x00"]],
    [["sg_sequence", "name_contains", "SQ\x00"]],
]
NORMAL = ("Shot", [["code", "is", "sh010"]], ["code", "sg_cut_in"])


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    with Rig(tmp_path_factory.mktemp("nul"), module_db_url, ingester=True, poll_interval=0.2) as r:
        yield r


def passes(rig: Rig) -> dict[str, int]:
    return rig.reader.info()["sgcache"]["passes"]


def test_nul_in_a_filter_passes_and_costs_no_one_else(rig: Rig) -> None:
    direct, client = rig.direct(), rig.client()
    client.find_one("Project", [])
    expected = direct.find(*NORMAL)
    rig.wait_hit(lambda: rig.reader.find(*NORMAL), lambda r: r == expected)
    for _round in range(3):
        for filters in NUL_FILTERS:
            assert client.find("Shot", filters, ["code"]) == direct.find("Shot", filters, ["code"]), filters
    counted = passes(rig)
    assert not {"db-backoff", "db-error", "internal-error"} & set(counted), counted
    assert counted.get("filter-value", 0) >= 3 * len(NUL_FILTERS), counted
    before = rig.reader_reads()
    assert rig.reader.find(*NORMAL) == expected
    assert rig.reader_reads() == before, "the other client's read should stay a hit"


def test_nul_in_a_write_costs_no_one_else(rig: Rig) -> None:
    """PostgreSQL cannot take SG's answer (nor the ingester its events): learning it fails without
    counting against the database, and what the write could not have changed stays a hit. (Reads
    of Shot pass on PostgreSQL while the row SG answered cannot be stored: a text with NUL is
    not the replica's to answer.)"""
    client = rig.client()
    assets = ("Asset", [["code", "is", "asset1"]], ["code"])
    expected = rig.direct().find(*assets)
    rig.wait_hit(lambda: rig.reader.find(*assets), lambda r: r == expected)
    before = passes(rig)
    created = client.create("Shot", {"code": "nul\x00shot", "project": {"type": "Project", "id": 1}})
    client.update("Shot", created["id"], {"description": "with a \x00 inside"})
    for _read in range(5):
        hits = rig.reader_reads()
        assert rig.reader.find(*assets) == expected
        assert rig.reader_reads() == hits, "a read of another type should stay a hit"
    counted = passes(rig)
    for reason in ("db-backoff", "db-error", "internal-error"):
        assert counted.get(reason, 0) == before.get(reason, 0), counted
    assert rig.proxy is not None and "Traceback" not in rig.proxy.output()  # not taken for a bug
