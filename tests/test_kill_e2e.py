"""An operator's SIGKILL at awkward moments: ``scripts/scan`` (``--full`` and the reconcile), the
ingester's link search after a revival and its re-read of a field after a schema change, and
mitmdump while it learns writes, killed part-way; then the proxy serving reads, then the work run again.

Each kill is checked to have landed mid-work: the process is stopped (SIGSTOP) when the replica or
the fake's request log shows the work started, the replica is inspected while nothing moves (some
of the work in it, not all of it), and only then is the process killed. The fake SG answers slowly
(``LATENCY`` per API3 call) so that the work spans many calls. Afterwards every read the proxy
answers must equal SG's answer at that moment, and the work run again must leave the replica equal
to SG, with no marker or queue left that would make reads pass for ever.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cache.replica import linksearch
from cache.replica.statekeys import EVENT_CURSOR

from .fakesg import FakeSite
from .processes import ScriptProcess
from .replica import assert_equal_to_site
from .rig import READER, READER_KEY, RIG_OPTIONS, Rig, populate
from .test_failopen import write_lock_held
from .wait import wait_until

#: Seconds the fake SG takes per API3 call while a process is to be killed part-way.
LATENCY = 0.15
#: Rows per page of the scans here (many pages per type).
PAGE = "4"
#: Extra rows of each of these types (several pages each, some retired).
EXTRA = 36
ORDER = [{"field_name": "id", "direction": "asc"}]


def populate_many(site: FakeSite) -> None:
    """:func:`populate`, plus ``EXTRA`` Assets, Shots (linking the Assets) and Versions (on the
    Shots), a few of each retired."""
    populate(site)
    project = site.find_direct("Project", [], ["id"])[0]
    proj = {"type": "Project", "id": project["id"]}
    assets = [site.create_direct("Asset", {"code": f"many-asset{i:02d}", "project": proj}) for i in range(EXTRA)]
    shots = []
    for i in range(EXTRA):
        links = [{"type": "Asset", "id": a["id"]} for a in assets[i % 5: i % 5 + 2]]
        shots.append(site.create_direct("Shot", {"code": f"many{i:03d}", "project": proj, "assets": links,
                                                  "sg_cut_in": 2000 + i}))
    for i in range(EXTRA):
        site.create_direct("Version", {"code": f"v{i:03d}", "project": proj,
                                       "entity": {"type": "Shot", "id": shots[i]["id"]}})
    for entity_type, rows in (("Asset", assets), ("Shot", shots)):
        for row in rows[-3:]:
            site.delete_direct(entity_type, row["id"])


def set_latency(rig: Rig, seconds: float) -> None:
    """The fake's delay per API3 call from now on (the running server's own setting)."""
    httpd = rig.server._httpd  # noqa: SLF001 - the server's test hook, changed while it serves
    assert httpd is not None
    httpd.latency = seconds


def count_rows(rig: Rig, entity_type: str) -> int:
    """Rows (active and retired) of a type in the replica."""
    table = rig.store.tables[entity_type]
    with rig.store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)


def site_rows(rig: Rig, entity_type: str) -> int:
    return len(rig.site.find_direct(entity_type, [], ["id"])) + \
        len(rig.site.find_direct(entity_type, [], ["id"], retired_only=True))


def primed_types(rig: Rig) -> set[str]:
    with rig.store.engine.connect() as conn:
        return set(rig.store.primed_fields(conn))


def stop_when(proc: ScriptProcess, condition: Callable[[], Any], what: str, timeout: float = 30) -> None:
    """Wait until ``condition`` holds, then freeze ``proc`` (SIGSTOP) so the test can look at what it
    did before it is killed; fails if the process ended first."""
    def ready() -> bool:
        assert proc.poll() is None, f"the process ended before {what}:\n{proc.output()[-3000:]}"
        return bool(condition())

    wait_until(ready, timeout, what, pause=0.01, detail=lambda: proc.output()[-3000:])
    os.kill(proc.pid, signal.SIGSTOP)


def kill(proc: ScriptProcess) -> None:
    """SIGKILL (a stopped process too) and reap."""
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def assert_proxy_reads_right(rig: Rig, types: list[str]) -> int:
    """Every row of each type, active and retired, plus a filtered read, through the proxy equal SG's
    answer now; returns how many of the reads the proxy answered from the replica (no read at SG)."""
    client, direct = rig.client(), rig.direct()
    hits = 0
    for entity_type in types:
        fields = [f for f in rig.store.cached_field_names(entity_type) if f != "id"]
        for retired in (False, True):
            before = rig.reads()
            ours = client.find(entity_type, [], fields, order=ORDER, retired_only=retired)
            hits += rig.reads() == before
            assert ours == direct.find(entity_type, [], fields, order=ORDER, retired_only=retired), \
                f"{entity_type} (retired={retired}) read through the proxy differs from SG"
    shots = [["code", "starts_with", "many0"], ["sg_cut_in", "greater_than", 2010]]
    assert client.find("Shot", shots, ["code", "assets"], order=ORDER) == \
        direct.find("Shot", shots, ["code", "assets"], order=ORDER)
    return hits


@pytest.fixture
def rig(db_url: str, tmp_path: Path) -> Iterator[Rig]:
    """The fake SG (``populate_many``) and an empty replica; the test runs the scan and the proxy."""
    with Rig(tmp_path, db_url, populate_site=populate_many, prime=None, proxy=False, poll_interval=0.1) as r:
        r.open_store(create=True)
        yield r


def start_scan(rig: Rig, *args: str, n: int = 0) -> ScriptProcess:
    return ScriptProcess("scan", [*args, "--page-size", PAGE], rig.env(), rig.workdir / f"scan-{n}.log")


def change_at_sg(site: FakeSite, tag: str, events: bool = True) -> None:
    """Writes straight to SG (no proxy): an update of a scanned and of a late Shot, a create, two
    retirements, a revival, and a Version moved to another Shot."""
    shots = site.find_direct("Shot", [["code", "starts_with", "many"]], ["id", "code"], ORDER)
    versions = site.find_direct("Version", [], ["id"], ORDER)
    site.update_direct("Shot", shots[1]["id"], {"code": f"{tag}-early", "sg_cut_in": 1}, events=events)
    site.update_direct("Shot", shots[-2]["id"], {"code": f"{tag}-late", "sg_cut_in": 2}, events=events)
    site.create_direct("Shot", {"code": f"many-{tag}-new"}, events=events)
    site.delete_direct("Shot", shots[4]["id"], events=events)
    retired = site.find_direct("Asset", [], ["id"], ORDER, retired_only=True)
    site.delete_direct("Asset", site.find_direct("Asset", [], ["id"], ORDER)[-1]["id"], events=events)
    site.revive_direct("Asset", retired[0]["id"], events=events)
    site.update_direct("Version", versions[2]["id"], {"entity": {"type": "Shot", "id": shots[-3]["id"]}},
                       events=events)


# -- 1. scan --full killed part-way -----------------------------------------------------------------
@pytest.mark.parametrize("victim", ["Asset", "Shot", "Version"])  # early, mid-run, the last type
def test_full_scan_killed_mid_type_then_reads_then_rerun(rig: Rig, victim: str) -> None:
    total = site_rows(rig, victim)
    set_latency(rig, LATENCY)
    scan = start_scan(rig, "--full")
    stop_when(scan, lambda: count_rows(rig, victim) >= 4, f"the scan writing its first page of {victim}")
    written = count_rows(rig, victim)
    primed = primed_types(rig)
    kill(scan)
    assert 4 <= written < total, (written, total)  # mid-type: some rows written, not all
    assert victim not in primed
    assert rig.state(EVENT_CURSOR) is not None  # the scan had recorded where the event stream starts
    set_latency(rig, 0)

    # the proxy on the half-primed replica: every answer is SG's (the victim's reads pass)
    rig.start_proxy(RIG_OPTIONS)
    hits = assert_proxy_reads_right(rig, rig.store.schema.entities)
    if victim != "Asset":
        assert hits > 0  # the types primed before the kill are answered from the replica

    # SG changes before the re-run, which the ingester (started from the scan's cursor) and the
    # re-run bring in
    change_at_sg(rig.site, "meanwhile")
    rig.start_ingester()
    rig.scan("--full", "--page-size", PAGE)
    rig.wait(rig.caught_up, timeout=30, what="the ingester catching up after the re-run")
    assert primed_types(rig) == set(rig.store.schema.entities)
    assert_equal_to_site(rig.store, rig.site)
    assert_proxy_reads_right(rig, ["Asset", "Shot", "Version"])


# -- 2. the reconcile killed part-way, with writes made without events ------------------------------
def test_reconcile_killed_mid_type_loses_no_silent_write(rig: Rig) -> None:
    rig.scan("--full", "--page-size", PAGE)
    site = rig.site
    # SG's clock well past the prime, so that the reconcile's overlap (120 s) cannot cover a watermark
    # moved past rows it never read
    site.advance_clock(minutes=30)
    shots = site.find_direct("Shot", [["code", "starts_with", "many"]], ["id"], ORDER)
    for i, shot in enumerate(shots):  # every Shot changed without events: pages of them to read
        site.update_direct("Shot", shot["id"], {"description": f"silent {i}"}, events=False)
    site.advance_clock(minutes=30)
    set_latency(rig, LATENCY)
    table = rig.store.tables["Shot"]

    def silent_read() -> int:
        with rig.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)
                                    .where(table.c.description.like("silent %"))).scalar() or 0)

    scan = start_scan(rig, "--types", "Asset,Shot,Version")
    stop_when(scan, silent_read, "the reconcile storing a first page of Shots written without events")
    silent = silent_read()
    kill(scan)
    assert 0 < silent < len(shots), (silent, len(shots))  # mid-type: some silent writes read, not all
    set_latency(rig, 0)

    site.advance_clock(minutes=30)
    change_at_sg(site, "after-kill", events=False)  # more writes the event log never shows
    change_at_sg(site, "with-events")
    rig.start_ingester()
    rig.scan("--types", "Asset,Shot,Version", "--page-size", PAGE)
    rig.wait(rig.caught_up, timeout=30, what="the ingester catching up after the reconcile")
    assert_equal_to_site(rig.store, site)


# -- 4. the ingester killed during a link search after a revival ------------------------------------
def linking_searches(site: FakeSite, since: int, revived: set[int]) -> int:
    """Reads after request ``since`` that ask which rows link one of the ``revived`` Assets."""
    def names_revived(value: Any) -> bool:
        if isinstance(value, dict):
            if value.get("type") == "Asset" and value.get("id") in revived:
                return True
            return any(names_revived(v) for v in value.values())
        if isinstance(value, list):
            return any(names_revived(v) for v in value)
        return False

    return sum(1 for name, params in site.requests[since:]
               if name == "read" and isinstance(params, dict)
               and names_revived((params.get("filters") or {}).get("conditions")))


def test_ingester_killed_during_link_search_finishes_it_after_restart(rig: Rig) -> None:
    site = rig.site
    # Assets retired before the prime: the Shots linking them are primed without the links, which SG
    # shows again on the revival (no event for the Shots): only the link search finds them
    linked = site.find_direct("Asset", [["code", "starts_with", "many-asset0"]], ["id"], ORDER)[:6]
    revived = {a["id"] for a in linked}
    for asset_id in revived:
        site.delete_direct("Asset", asset_id)
    site.add_script(READER, READER_KEY)
    rig.scan("--full", "--page-size", PAGE)
    rig.start_proxy(RIG_OPTIONS)
    first = rig.start_ingester()
    rig.wait(rig.caught_up, what="the first catch-up")

    set_latency(rig, LATENCY)
    since = len(site.requests)
    site.hold_event_ids(len(revived))  # the revivals become visible at once: one poll, one search
    for asset_id in sorted(revived):
        site.revive_direct("Asset", asset_id)
    site.release_held()
    search = rig.store.link_search

    def queued() -> int:
        with rig.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(search)).scalar() or 0)

    stop_when(first, lambda: queued() and linking_searches(site, since, revived) >= 2,
              "the ingester asking SG for the rows linking the revived Assets")
    asked, left = linking_searches(site, since, revived), queued()
    kill(first)
    fields = linksearch.link_fields(rig.store, "Asset")
    assert left == len(revived), left  # the search had not finished: every revival still queued
    assert 2 <= asked < 2 * len(fields), (asked, fields)  # mid-search: some link fields asked, not all
    # meanwhile the reads the revival may change pass; whatever the proxy answers is SG's answer
    assert_proxy_reads_right(rig, ["Asset", "Shot", "Version"])

    set_latency(rig, 0)
    rig.start_ingester()
    rig.wait(lambda: rig.caught_up() and queued() == 0, timeout=30, what="the search and fetches done")
    assert_equal_to_site(rig.store, site)

    # and the markers the revival set clear: a read of the Shots' links is answered again
    rig.wait(lambda: _markers(rig) == 0, timeout=30, what="the pending-write markers clearing")
    reader = rig.client(script_name=READER, api_key=READER_KEY)
    shots = [["assets", "in", [{"type": "Asset", "id": i} for i in sorted(revived)]]]
    expected = rig.direct().find("Shot", shots, ["code", "assets"], order=ORDER)
    assert expected  # the revived Assets are linked again
    rig.wait_hit(lambda: reader.find("Shot", shots, ["code", "assets"], order=ORDER),
                 lambda answer: answer == expected)


def _markers(rig: Rig) -> int:
    with rig.store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(rig.store.pending)).scalar() or 0)


# -- 3. mitmdump killed while learning writes -------------------------------------------------------
def test_proxy_killed_while_learning_then_a_fresh_proxy_and_the_ingester(db_url: str, tmp_path: Path) -> None:
    """Clients write and read through the proxy while another connection holds the replica's write
    lock (the learns wait, then are deferred in memory); the proxy is killed with writes applied at SG
    and not in the replica. A fresh proxy on the same replica, once the ingester has the writes,
    answers every read as SG does, and no marker is left to make reads pass for ever."""
    with Rig(tmp_path, db_url, populate_site=populate_many, ingester=True, poll_interval=0.1) as rig:
        site = rig.site
        shots = site.find_direct("Shot", [["code", "starts_with", "many"]], ["id"], ORDER)[:8]
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            sg = rig.client()
            value = 5000 + 100 * n
            while not stop.is_set():
                value += 1
                try:
                    sg.update("Shot", shots[n]["id"], {"sg_cut_in": value, "description": f"w{n}-{value}"})
                    sg.find("Shot", [["id", "is", shots[n]["id"]]], ["sg_cut_in", "description"])
                except Exception as exc:  # noqa: BLE001 - the proxy is killed under it
                    errors.append(exc)
                    return

        updates = site.count("update")
        threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(len(shots))]
        with write_lock_held(db_url):
            for thread in threads:
                thread.start()
            wait_until(lambda: site.count("update") >= updates + len(shots), 30, "writes applied at SG")
            proxy = rig.proxy
            assert proxy is not None and proxy.proc is not None
            proxy.proc.send_signal(signal.SIGKILL)
            proxy.proc.wait(10)
            stop.set()
            # mid-learn: SG has writes the replica does not (the lock kept every learn out)
            ids = [s["id"] for s in shots]
            at_sg = {r["id"]: r["sg_cut_in"] for r in site.find_direct("Shot", [["id", "in", ids]], ["sg_cut_in"])}
            table = rig.store.tables["Shot"]
            with rig.store.engine.connect() as conn:
                ours = {r.id: r.sg_cut_in for r in conn.execute(sa.select(table.c.id, table.c.sg_cut_in)
                                                                 .where(table.c.id.in_(ids)))}
            assert any(ours[i] != at_sg[i] for i in ids), (ours, at_sg)
        for thread in threads:
            thread.join(30)
        assert errors  # the clients saw the proxy die

        fresh = rig.start_proxy([], workdir=tmp_path / "fresh")
        rig.wait(rig.caught_up, timeout=30, what="the ingester applying the writes")
        reader = rig.client(fresh, script_name=READER, api_key=READER_KEY)
        direct = rig.direct()
        for shot in shots:
            query = [["id", "is", shot["id"]]]
            assert reader.find("Shot", query, ["sg_cut_in", "description"]) == \
                direct.find("Shot", query, ["sg_cut_in", "description"])
        assert_equal_to_site(rig.store, site)
        rig.wait(lambda: _markers(rig) == 0, timeout=30, what="the pending-write markers clearing")
        everything = direct.find("Shot", [], ["code", "sg_cut_in", "description", "assets"], order=ORDER)
        rig.wait_hit(lambda: reader.find("Shot", [], ["code", "sg_cut_in", "description", "assets"], order=ORDER),
                     lambda answer: answer == everything)


def test_full_scan_killed_at_random_points_repeatedly(rig: Rig) -> None:
    """Kill after kill after a random number of SG calls (inside a page's transaction too, some of the
    time), SG changing in between: each time the proxy's answers are SG's; the run that completes,
    with the ingester, leaves the replica equal to SG."""
    rng = random.Random(11)
    site = rig.site
    before = len(site.requests)
    rig.scan("--full", "--page-size", PAGE)
    calls = len(site.requests) - before  # what one whole run asks SG
    rig.start_proxy(RIG_OPTIONS)
    set_latency(rig, 0.01)
    kills = 0
    for n in range(5):
        change_at_sg(site, f"round{n}")
        at = len(site.requests)
        point = rng.randrange(2, calls - 2)
        scan = start_scan(rig, "--full", n=n)
        wait_until(lambda: len(site.requests) - at >= point or scan.poll() is not None,  # noqa: B023
                   30, f"the scan's {point}th call to SG", pause=0.005)
        if scan.poll() is None:
            kill(scan)
            kills += 1
        assert_proxy_reads_right(rig, ["Asset", "Shot", "Version"])
    assert kills >= 4, kills  # killed mid-run (a run that ended first is not one)
    set_latency(rig, 0)
    rig.start_ingester()
    rig.scan("--full", "--page-size", PAGE)
    rig.wait(rig.caught_up, timeout=30, what="the ingester catching up after the last run")
    assert primed_types(rig) == set(rig.store.schema.entities)
    assert_equal_to_site(rig.store, site)


# -- 4b. the ingester killed while it reads a field again after a schema change ---------------------
def test_ingester_killed_while_it_reads_a_field_again_after_a_schema_change(db_url: str, tmp_path: Path) -> None:
    """``schema_field_update`` through the proxy un-primes ``Shot.sg_cut_in`` until the ingester has
    read it again for every row; values SG changed without events meanwhile come only with that
    re-read. Killed part-way (the active rows stored, the field not primed yet), the restarted
    ingester reads it again and primes it: the proxy answers it again, as SG."""
    with Rig(tmp_path, db_url, populate_site=populate_many, ingester=True, poll_interval=0.1) as rig:
        site = rig.site
        rig.wait(rig.caught_up, what="the first catch-up")
        proc = rig.ingester
        assert proc is not None
        shots = site.find_direct("Shot", [], ["id"], ORDER)
        set_latency(rig, 1.0)  # the re-read's two finds (active, retired rows) each take that long
        for i, shot in enumerate(shots):  # no event: only the re-read brings these
            site.update_direct("Shot", shot["id"], {"sg_cut_in": 9000 + i}, events=False)
        rig.client().schema_field_update("Shot", "sg_cut_in", {"description": "frame in"})
        table, fields = rig.store.tables["Shot"], rig.store.fields

        def silent_stored() -> int:
            with rig.store.engine.connect() as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(table)
                                        .where(table.c.sg_cut_in >= 9000)).scalar() or 0)

        def cut_in_primed() -> bool:
            with rig.store.engine.connect() as conn:
                return bool(conn.execute(sa.select(fields.c.primed).where(
                    (fields.c.entity_type == "Shot") & (fields.c.field_name == "sg_cut_in"))).scalar())

        stop_when(proc, silent_stored, "the re-read storing the active rows")
        stored, primed = silent_stored(), cut_in_primed()
        kill(proc)
        assert stored == len(shots) and not primed  # mid-re-read: the rows in, the field not primed yet
        set_latency(rig, 0)

        reader = rig.client(script_name=READER, api_key=READER_KEY)
        query = [["sg_cut_in", "greater_than", 9000]]
        assert reader.find("Shot", query, ["sg_cut_in"], order=ORDER) == \
            rig.direct().find("Shot", query, ["sg_cut_in"], order=ORDER)
        rig.start_ingester()
        rig.wait(cut_in_primed, timeout=30, what="the restarted ingester priming Shot.sg_cut_in again")
        rig.wait(rig.caught_up, timeout=30, what="the catch-up")
        with rig.store.engine.connect() as conn:  # (updated_at moved without events too: a reconcile's work)
            ours = dict(conn.execute(sa.select(table.c.id, table.c.sg_cut_in)).all())
        at_sg = {r["id"]: r["sg_cut_in"] for retired in (False, True)
                 for r in site.find_direct("Shot", [], ["sg_cut_in"], retired_only=retired)}
        assert ours == at_sg
        expected = rig.direct().find("Shot", query, ["sg_cut_in"], order=ORDER)
        rig.wait_hit(lambda: reader.find("Shot", query, ["sg_cut_in"], order=ORDER),
                     lambda answer: answer == expected)
