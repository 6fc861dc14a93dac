"""EventLogEntry cached, end to end: fake SG server, scan --full, scripts/ingest-events, mitmdump, and
a real shotgun_api3 client reading events through the proxy (its reads that reach the fake SG are
misses; see tests/rig.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import shotgun_api3

from .fakesg import FakeSite
from .rig import Rig

WITHIN = 5.0  # seconds; the ingester polls every 0.2 s
FIELDS = ["event_type", "attribute_name", "meta", "entity", "project", "user", "session_uuid",
          "description", "created_at"]
ASC = [{"field_name": "id", "direction": "asc"}]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    proj = site.create_direct("Project", {"name": "Events"})
    for i in range(30):
        site.create_direct("Shot", {"code": f"sh{i:03d}", "project": proj})
    with Rig(tmp_path_factory.mktemp("events"), module_db_url, site, ingester=True, poll_interval=0.2,
             ingest_args=("--gap-timeout", "5"), extra_rules="+EventLogEntry.*\n") as r:
        yield r


def direct(rig: Rig) -> shotgun_api3.Shotgun:
    return rig.direct()


def passes(rig: Rig, reason: str) -> int:
    return int(rig.reader.info()["sgcache"]["passes"].get(reason, 0))


def test_new_events_show_as_hits_within_seconds(rig: Rig) -> None:
    proj = rig.site.find_direct("Project", [], ["id"])[0]
    shot = rig.site.create_direct("Shot", {"code": "fresh", "project": proj})
    rig.site.update_direct("Shot", shot["id"], {"code": "fresher"})
    newest = rig.site.last_event_id()
    query = [["id", "greater_than", newest - 5], ["id", "less_than", newest + 1]]
    sg_answer = direct(rig).find("EventLogEntry", query, FIELDS, order=ASC)
    elapsed, _ = rig.wait_hit(lambda: rig.reader.find("EventLogEntry", query, FIELDS, order=ASC),
                              lambda r: r == sg_answer)
    assert elapsed < WITHIN
    assert sg_answer[-1]["meta"]["new_value"] == "fresher"


def test_read_past_the_cursor_passes(rig: Rig) -> None:
    before, reads = passes(rig, "events-ahead"), rig.reader_reads()
    newest = rig.site.last_event_id()
    got = rig.reader.find("EventLogEntry", [["id", "greater_than", newest - 3]], FIELDS, order=ASC)
    assert rig.reader_reads() == reads + 1  # answered by SG
    assert got == direct(rig).find("EventLogEntry", [["id", "greater_than", newest - 3]], FIELDS, order=ASC)
    assert passes(rig, "events-ahead") == before + 1


def test_read_below_the_cursor_is_a_hit_equal_to_sg(rig: Rig) -> None:
    newest = rig.site.last_event_id()
    query = [["id", "between", [1, newest]], ["event_type", "is", "Shotgun_Shot_Change"]]
    sg_answer = direct(rig).find("EventLogEntry", query, FIELDS, order=ASC)
    assert sg_answer
    rig.wait_hit(lambda: rig.reader.find("EventLogEntry", query, FIELDS, order=ASC), lambda r: r == sg_answer)


def test_poller_never_misses_an_event(rig: Rig) -> None:
    """A daemon polls ``id > last`` (id ascending, 7 at a time) through the proxy while events keep
    coming: it sees every event once, in order; the catching-up pages are cache hits."""
    proj = rig.site.find_direct("Project", [], ["id"])[0]
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            rig.site.create_direct("Shot", {"code": f"poll{n}", "project": proj})
            n += 1
            time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[int] = []
    last, hits = 0, 0
    deadline = time.monotonic() + 8
    try:
        while time.monotonic() < deadline:
            reads = rig.reader_reads()
            page = rig.reader.find("EventLogEntry", [["id", "greater_than", last]], ["id", "event_type"],
                               order=ASC, limit=7)
            hits += rig.reader_reads() == reads
            seen.extend(e["id"] for e in page)
            if page:
                last = page[-1]["id"]
    finally:
        stop.set()
        thread.join()
    seen.extend(e["id"] for e in direct(rig).find("EventLogEntry", [["id", "greater_than", last]], ["id"], order=ASC))
    assert seen == [e["id"] for e in direct(rig).find("EventLogEntry", [], ["id"], order=ASC)]
    assert hits > 0


def test_ingester_logs_why_it_stops_and_its_cursor(rig: Rig) -> None:
    assert rig.ingester is not None
    rig.ingester.terminate()
    rig.ingester.wait(30)
    text = rig.ingest_log()
    assert "ingester stopping (signal SIGTERM): event cursor" in text, text[-2000:]
    assert "sweep: applied" not in text  # no false alarm after the prime
