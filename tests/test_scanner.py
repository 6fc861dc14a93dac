"""scripts/scan against the fake SG, the replica on ``db_url`` (SQLite or PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cache.ingest import IngestConfig, Ingester
from cache.replica.schema import Schema
from cache.replica.statekeys import EVENT_CURSOR
from cache.replica.store import Store
from cache.scan.scanner import Scanner
from cache.wire import parse_when

from .fakesg import FakeSite
from .paths import REPO
from .replica import SiteClient, assert_equal_to_site, cached_schema, make_project, prime, replica_read, sync
from .rig import KEY, SCRIPT, Rig

T0 = dt.datetime(2024, 3, 1, 12, 0, 0)
#: Whole types, so that uncached data types (image, ...) are in the schema and must not be read.
RULES = "+Project\n+Sequence\n+Shot\n+Task\n+HumanUser\n-*.tags\n"


def scan(rig: Rig, *args: str, page_size: int = 2) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/scan`` (small pages, to exercise the keyset loop); fail with its output."""
    return rig.run("scan", "--db", rig.db_url, "--schema", str(rig.schema_path), "--page-size", str(page_size),
                   "--quiet", *args)


def open_store(rig: Rig) -> Store:
    """The replica, opened anew (the caller disposes of it)."""
    return Store.open(rig.db_url, Schema.load(rig.schema_path))


def populate(site: FakeSite) -> dict[str, Any]:
    """Two projects with sequences, shots of every cacheable kind of value, tasks; some retired."""
    site.set_clock(T0)
    projects = [site.create_direct("Project", {"name": f"P{i}"}) for i in (1, 2)]
    links = [{"type": "Project", "id": p["id"]} for p in projects]
    seqs = [site.create_direct("Sequence", {"code": f"SQ{i}", "project": links[i % 2]}) for i in range(2)]
    shots = []
    for i in range(7):
        shots.append(site.create_direct("Shot", {
            "code": f"sh{i:03d}", "project": links[i % 2],
            "sg_sequence": {"type": "Sequence", "id": seqs[i % 2]["id"]} if i != 3 else None,
            "sg_cut_in": 1001 + i, "sg_frame_rate": 24.0 if i % 2 else None, "sg_omit": i == 2,
            "sg_due_date": f"2024-04-0{i + 1}", "sg_last_review": T0 - dt.timedelta(days=i),
            "sg_status_list": ["ip", "fin", "wtg"][i % 3], "sg_data": {"k": [i]},
        }))
    tasks = [site.create_direct("Task", {"content": f"task{i}", "project": links[0],
                                         "entity": {"type": "Shot", "id": shots[i]["id"]}}) for i in range(3)]
    site.delete_direct("Shot", shots[6]["id"])
    site.delete_direct("Task", tasks[2]["id"])
    return {"projects": projects, "shots": shots, "tasks": tasks}


@pytest.fixture
def rig(tmp_path: Path, db_url: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    populate(site)
    with Rig(tmp_path, db_url, site, rules=RULES, prime=None, proxy=False) as rig:
        yield rig


def sg_rows(site: FakeSite, entity_type: str) -> dict[int, bool]:
    """id -> retired, for every row SG has."""
    out = {r["id"]: False for r in site.find_direct(entity_type)}
    out.update({r["id"]: True for r in site.find_direct(entity_type, retired_only=True)})
    return out


def replica_rows(store: Store, entity_type: str) -> dict[int, bool]:
    table = store.tables[entity_type]
    with store.engine.connect() as conn:
        return {r.id: bool(r._retired) for r in conn.execute(sa.select(table.c.id, table.c._retired))}


def change_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(store.changes)).scalar_one()


def type_state(store: Store) -> dict[str, tuple[bool, str | None]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(store.types)).all()
    return {r.entity_type: (bool(r.primed), r.scan_watermark) for r in rows}


def shot_row(store: Store, shot_id: int) -> Any:
    table = store.tables["Shot"]
    with store.engine.connect() as conn:
        return conn.execute(sa.select(table).where(table.c.id == shot_id)).one()


def test_full_scan_primes_every_type(rig: Rig) -> None:
    cursor = rig.site.last_event_id()
    scan(rig, "--full")
    store = open_store(rig)
    try:
        for entity_type in Schema.load(rig.schema_path).entities:
            assert replica_rows(store, entity_type) == sg_rows(rig.site, entity_type), entity_type
        state = type_state(store)
        assert set(state) == set(Schema.load(rig.schema_path).entities)
        assert all(primed for primed, _ in state.values())
        assert state["Shot"][1] == "2024-03-01T12:00:00Z"  # SG's updated_at, not the local clock
        with store.engine.connect() as conn:
            assert store.get_state(conn, EVENT_CURSOR) == cursor
        shot = next(r for r in rig.site.find_direct("Shot", [["code", "is", "sh001"]],
                                                    ["sg_sequence", "sg_frame_rate", "sg_data"]))
        row = shot_row(store, shot["id"])
        assert (row.code, row.sg_cut_in, row.sg_frame_rate, row.sg_omit) == ("sh001", 1002, 24.0, False)
        assert (row.sg_sequence__type, row.sg_sequence__id) == ("Sequence", shot["sg_sequence"]["id"])
        assert row.sg_last_review == "2024-02-29T12:00:00Z" and row.sg_due_date == "2024-04-02"
        links = sum(len(r["tasks"]) for retired in (False, True)
                    for r in rig.site.find_direct("Shot", fields=["tasks"], retired_only=retired))
        tasks_table = store.multi[("Shot", "tasks")]
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(tasks_table)).scalar_one() == links == 2
    finally:
        store.dispose()
    reads = [p for name, p in rig.site.requests if name == "read" and p["type"] == "Shot"]
    assert len(reads) >= 4  # 6 active + 1 retired rows in pages of 2
    assert all("image" not in p["return_fields"] for p in reads)  # uncached data type: never read
    assert {p.get("return_only", "active") for p in reads} == {"active", "retired"}


def test_rescan_changes_nothing(rig: Rig) -> None:
    scan(rig, "--full")
    store = open_store(rig)
    try:
        before = change_count(store)
        assert before > 0
        scan(rig, "--full")
        scan(rig)  # a watermark pass re-reads the overlap: still nothing new
        assert change_count(store) == before
    finally:
        store.dispose()


def test_rows_gone_at_sg_are_retired(rig: Rig, request: Any) -> None:
    shots = {r["code"]: r["id"] for r in rig.site.find_direct("Shot", fields=["code"])}
    scan(rig, "--full")
    rig.site.delete_direct("Shot", shots["sh000"], events=False)  # retired at SG
    with rig.site._lock:  # no helper in the fake for a row that vanished (purged); drop it directly
        del rig.site._state.rows["Shot"][shots["sh001"]]
    scan(rig, "--full", "--types", "Shot")
    store = open_store(rig)
    try:
        rows = replica_rows(store, "Shot")
        assert rows[shots["sh000"]] is True and rows[shots["sh001"]] is True
        assert rows[shots["sh002"]] is False
        with store.engine.connect() as conn:
            logged = conn.execute(
                sa.select(store.changes.c.entity_id)
                .where((store.changes.c.source == "scan")
                       & store.changes.c.field_name.in_(["retired", "_retired"]))
            ).scalars().all()
            names = {r.id: r.retired for r in conn.execute(
                sa.select(store.entities).where(store.entities.c.type == "Shot"))}
        assert sorted(logged) == sorted([shots["sh000"], shots["sh001"]])
        assert names[shots["sh001"]] is True
    finally:
        store.dispose()


def test_since_and_watermark_pick_up_silent_writes(rig: Rig) -> None:
    shots = {r["code"]: r["id"] for r in rig.site.find_direct("Shot", fields=["code"])}
    scan(rig, "--full")
    rig.site.set_clock(T0 + dt.timedelta(hours=1))
    rig.site.update_direct("Shot", shots["sh002"], {"code": "renamed", "sg_cut_in": 7}, events=False)
    rig.site.reset_counts()
    scan(rig, "--since", "2024-03-01T12:30:00Z", "--types", "Shot")
    store = open_store(rig)
    try:
        row = shot_row(store, shots["sh002"])
        assert (row.code, row.sg_cut_in) == ("renamed", 7)
        assert type_state(store)["Shot"] == (True, "2024-03-01T13:00:00Z")
        read = next(p for name, p in rig.site.requests if name == "read" and p["type"] == "Shot")
        assert "updated_at" in str(read["filters"])
        # a watermark pass (no flag) picks up the next silent write
        rig.site.set_clock(T0 + dt.timedelta(hours=2))
        rig.site.update_direct("Shot", shots["sh004"], {"description": "later"}, events=False)
        scan(rig)
        assert shot_row(store, shots["sh004"]).description == "later"
        assert type_state(store)["Shot"] == (True, "2024-03-01T14:00:00Z")
    finally:
        store.dispose()


def test_projects_scan_is_partial(rig: Rig) -> None:
    p1 = rig.site.find_direct("Project", [["name", "is", "P1"]])[0]["id"]
    scan(rig, "--full", "--projects", str(p1))
    store = open_store(rig)
    try:
        state = type_state(store)
        assert "Shot" not in state and "Project" not in state  # partial: not primed
        assert state["HumanUser"][0] is True  # no project field: read whole
        in_p1 = [["project", "is", {"type": "Project", "id": p1}]]
        shots = {r["id"]: retired for retired in (False, True)
                 for r in rig.site.find_direct("Shot", in_p1, retired_only=retired)}
        assert replica_rows(store, "Shot") == shots and True in shots.values()
        assert set(replica_rows(store, "Project")) == {p1}
    finally:
        store.dispose()


def test_bad_types_exit_2(rig: Rig) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "scan"), "--db", rig.db_url, "--schema",
         str(rig.schema_path), "--site", rig.server.url, "--script-name", SCRIPT, "--script-key", KEY,
         "--full", "--types", "Shot,Nope"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "Nope" in proc.stderr


class DirectClient:
    """shotgun_api3's ``find`` served by a FakeSite in-process; creates a row between pages."""

    def __init__(self, site: FakeSite, on_read: Any = None):
        self.site = site
        self.on_read = on_read

    def find(self, entity_type: str, filters: Any, fields: list[str] | None = None,
             order: Any = None, limit: int = 0, retired_only: bool = False) -> list[dict[str, Any]]:
        rows = self.site.find_direct(entity_type, filters, fields, order, retired_only=retired_only)
        if self.on_read:
            self.on_read(entity_type)
        return rows[:limit] if limit else rows


def test_keyset_pages_survive_concurrent_inserts(rig: Rig) -> None:
    """A row created mid-scan neither shifts pages nor is lost; ids read are never repeated."""
    created: list[int] = []

    def on_read(entity_type: str) -> None:
        if entity_type == "Shot" and not created:
            created.append(rig.site.create_direct("Shot", {"code": "late"}, events=False)["id"])

    store = open_store(rig)
    try:
        scan = Scanner(store, DirectClient(rig.site, on_read), page_size=2).full_scan("Shot")
        assert created[0] in scan.seen
        assert scan.rows == len(sg_rows(rig.site, "Shot"))
        assert replica_rows(store, "Shot") == sg_rows(rig.site, "Shot")
    finally:
        store.dispose()


# -- in-process: the scanner beside writers of the replica -----------------------------
@pytest.fixture
def store(db_url: str, site: FakeSite) -> Iterator[Store]:
    st = Store.open(db_url, cached_schema(site))
    yield st
    st.dispose()


@pytest.fixture
def ingester(store: Store, site: FakeSite) -> Iterator[Ingester]:
    client = SiteClient(site)
    prime(store, client)
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01, gap_timeout=300))
    yield ing
    ing.close()


def test_prime_watermark_is_sg_time_before_the_first_page(site: FakeSite, store: Store) -> None:
    """A script without events updates row A after A's page was read, then row B (a later page)
    more than the overlap later. A watermark taken from the rows read (B's time) would put A's
    write below every later reconcile's start: the watermark is SG's time before the first page."""
    site.set_clock(dt.datetime(2026, 2, 1, 9, 0, 0))
    proj = make_project(site)
    a = site.create_direct("Shot", {"code": "a0", "project": proj})
    b = site.create_direct("Shot", {"code": "b0", "project": proj})
    client = SiteClient(site)
    find = client.find
    done: list[int] = []

    def during_the_prime(entity_type: str, filters: Any, fields: list[str] | None = None, **kw: Any) -> Any:
        rows = find(entity_type, filters, fields, **kw)
        if entity_type == "Shot" and "code" in (fields or []) and not done and any(r["id"] == a["id"] for r in rows):
            done.append(1)  # A's page is read: now the silent writes
            site.advance_clock(seconds=10)
            site.update_direct("Shot", a["id"], {"code": "a1"}, events=False)
            site.advance_clock(seconds=300)
            site.update_direct("Shot", b["id"], {"code": "b1"}, events=False)
        return rows

    client.find = during_the_prime  # type: ignore[method-assign]
    scanner = Scanner(store, client, page_size=1)
    scanner.prime(sorted(store.schema.entities))
    assert scanner.primed_types()["Shot"] == "2026-02-01T09:00:00Z"
    site.advance_clock(seconds=60)
    scanner.reconcile(sorted(store.schema.entities))
    site.advance_clock(seconds=600)
    scanner.reconcile(sorted(store.schema.entities))
    codes = {r["id"]: r["code"] for r in replica_read(store, "Shot", ["code"], False)}
    assert codes == {a["id"]: "a1", b["id"]: "b1"}


def test_a_page_never_overwrites_what_the_ingester_applied_meanwhile(site: FakeSite, store: Store,
                                                                   ingester: Ingester) -> None:
    """The reconcile reads a page (code "a"); before it writes the page, the Shot becomes "b" (with
    an event) and the ingester applies it. The page's older row is not written over the newer one
    (no event would ever correct it): the row is queued for a fetch instead."""
    site.set_clock(dt.datetime(2026, 2, 1, 9, 0, 0))
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "a", "project": proj})
    sync(ingester)
    Scanner(store, SiteClient(site)).prime(["Shot"])
    site.advance_clock(seconds=30)
    site.update_direct("Shot", shot["id"], {"description": "touched"})
    sync(ingester)
    client = SiteClient(site)
    find = client.find
    done: list[int] = []

    def page_then_change(entity_type: str, filters: Any, fields: list[str] | None = None, **kw: Any) -> Any:
        rows = find(entity_type, filters, fields, **kw)
        if entity_type == "Shot" and "code" in (fields or []) and not done and any(r["id"] == shot["id"] for r in rows):
            done.append(1)  # the page is read; it is written after this change is applied
            site.advance_clock(seconds=1)
            site.update_direct("Shot", shot["id"], {"code": "b"})
            sync(ingester)
            assert replica_read(store, "Shot", ["code"], False)[0]["code"] == "b"
        return rows

    client.find = page_then_change  # type: ignore[method-assign]
    Scanner(store, client).reconcile(["Shot"])
    assert done
    assert replica_read(store, "Shot", ["code"], False)[0]["code"] == "b"  # SG's value
    q = store.fetch_queue
    with store.engine.connect() as conn:
        assert [(r.entity_type, r.entity_id) for r in conn.execute(sa.select(q))] == [("Shot", shot["id"])]
    sync(ingester)
    assert replica_read(store, "Shot", ["code", "description"], False)[0]["code"] == "b"


def test_a_page_leaving_out_a_link_to_a_live_entity_waits_for_the_ingester(site: FakeSite, store: Store,
                                                                          ingester: Ingester) -> None:
    """The Task is retired at SG and the reconcile reads the Version (``sg_task`` None) before the
    ingester polled the retirement: stored then, the link was lost for good (SG shows it again on
    revival, with no event for the Version). The row is queued for the ingester's fetch instead,
    which stores it once the retirement is applied (the link kept hidden)."""
    site.set_clock(dt.datetime(2026, 2, 1, 9, 0, 0))
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    task = site.create_direct("Task", {"content": "comp", "project": proj, "entity": shot})
    version = site.create_direct("Version", {"code": "v1", "project": proj, "entity": shot, "sg_task": task})
    sync(ingester)
    Scanner(store, SiteClient(site)).prime(["Version"])
    site.advance_clock(seconds=30)
    site.delete_direct("Task", task["id"])
    site.update_direct("Version", version["id"], {"code": "v1b"})
    Scanner(store, SiteClient(site)).reconcile(["Version"])
    q = store.fetch_queue
    with store.engine.connect() as conn:
        assert [(r.entity_type, r.entity_id) for r in conn.execute(sa.select(q))] == [("Version", version["id"])]
    assert replica_read(store, "Version", ["code"], False)[0]["code"] == "v1"
    sync(ingester)
    site.revive_direct("Task", task["id"])
    sync(ingester)
    assert replica_read(store, "Version", ["sg_task"], False)[0]["sg_task"]["id"] == task["id"]
    assert_equal_to_site(store, site)


def test_a_revival_only_a_reconcile_sees_brings_back_the_links_sg_shows_again(site: FakeSite, store: Store,
                                                                             ingester: Ingester) -> None:
    """A Version is created with its Task, and the Task retired before the ingester read the
    Version (stored with ``sg_task`` None). The Task's revival leaves no event the ingester sees
    (given up in a gap, say): a reconcile finds the Task live. The rows SG shows linking it must
    be read again, as on a revival event; else the Version keeps None for good."""
    site.set_clock(dt.datetime(2026, 2, 1, 9, 0, 0))
    proj = make_project(site)
    task = site.create_direct("Task", {"content": "comp", "project": proj})
    sync(ingester)
    version = site.create_direct("Version", {"code": "v1", "project": proj, "sg_task": task})
    site.delete_direct("Task", task["id"])
    sync(ingester)
    Scanner(store, SiteClient(site)).prime(["Task"])
    site.advance_clock(seconds=30)
    site.events_enabled = False
    try:
        site.revive_direct("Task", task["id"])
    finally:
        site.events_enabled = True
    Scanner(store, SiteClient(site)).reconcile(["Task"])
    sync(ingester)
    assert [r["sg_task"]["id"] for r in replica_read(store, "Version", ["sg_task"], False)
            if r["id"] == version["id"]] == [task["id"]]
    assert_equal_to_site(store, site)


def test_full_scan_does_not_retire_a_row_revived_while_it_ran(site: FakeSite, store: Store,
                                                              ingester: Ingester) -> None:
    """A retired Shot is revived after the full scan's active pass and before its retired pass, and
    the ingester applies the revival: neither pass saw it. SG is asked again before the scan
    retires what it did not see, and an active row is left active."""
    proj = make_project(site)
    x = site.create_direct("Shot", {"code": "x", "project": proj})
    site.create_direct("Shot", {"code": "y", "project": proj})
    sync(ingester)
    site.delete_direct("Shot", x["id"])
    sync(ingester)
    client = SiteClient(site)
    find = client.find
    done: list[int] = []

    def revive_between_passes(entity_type: str, filters: Any, fields: list[str] | None = None, **kw: Any) -> Any:
        if entity_type == "Shot" and kw.get("retired_only") and not done:
            done.append(1)
            site.revive_direct("Shot", x["id"])
            sync(ingester)
            assert [r["code"] for r in replica_read(store, "Shot", ["code"], False)] == ["x", "y"]
        return find(entity_type, filters, fields, **kw)

    client.find = revive_between_passes  # type: ignore[method-assign]
    scan = Scanner(store, client).full_scan("Shot")
    assert done and scan.retired_missing == 0
    assert [r["code"] for r in site.find_direct("Shot", [], ["code"])] == ["x", "y"]
    assert [r["code"] for r in replica_read(store, "Shot", ["code"], False)] == ["x", "y"]


def test_parse_when() -> None:
    assert parse_when("2024-03-01T12:00:00Z") == dt.datetime(2024, 3, 1, 12, tzinfo=dt.UTC)
    assert parse_when("2024-03-01T14:00:00+02:00") == dt.datetime(2024, 3, 1, 12, tzinfo=dt.UTC)
    assert parse_when("2024-03-01") == dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


class ApiDecodingClient(SiteClient):
    """A SiteClient whose rows go through shotgun_api3's own decoding (``_transform_inbound``, as
    the scripts' client has it, ``convert_datetimes_to_utc=False``): every string of SG's datetime
    shape comes back a ``datetime``, whatever field holds it."""

    def __init__(self, site: FakeSite):
        super().__init__(site)
        import shotgun_api3

        self._api = shotgun_api3.Shotgun("https://example.shotgunstudio.com", script_name="s", api_key="k",
                                         connect=False, convert_datetimes_to_utc=False)

    def find(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return self._api._transform_inbound(super().find(*args, **kwargs))


def test_full_scan_stores_a_text_value_shotgun_api3_decodes_as_a_datetime(site: FakeSite, store: Store) -> None:
    """A Version's ``code`` that reads like a datetime (``2024-01-02T03:04:05Z``) comes back from
    shotgun_api3 as a ``datetime``. The full scan must store the row as SG has it (the ingester's
    fetch turns such values back with cache.wire.to_wire); a row it cannot store must not leave
    the type primed without it: a read answered from the replica would lack the Version."""
    proj = make_project(site)
    site.create_direct("Version", {"code": "2024-01-02T03:04:05Z", "project": proj})
    site.create_direct("Version", {"code": "0999-01-02T03:04:05Z", "project": proj})
    Scanner(store, ApiDecodingClient(site)).prime(sorted(store.schema.entities))
    assert sorted(r["code"] for r in replica_read(store, "Version", ["code"], False)) == \
        ["0999-01-02T03:04:05Z", "2024-01-02T03:04:05Z"]
    assert_equal_to_site(store, site)


def test_a_row_the_scan_cannot_store_is_queued_not_left_out(site: FakeSite, store: Store) -> None:
    """A row whose value the write path refuses (here a text field that came back a number) is
    not stored by the page; the type is still marked primed at the end of the full scan, so the
    row must be queued for the ingester's fetch (its type's reads pass meanwhile), not left out of
    answers served from the replica."""
    proj = make_project(site)
    good = site.create_direct("Version", {"code": "v1", "project": proj})
    bad = site.create_direct("Version", {"code": "v2", "project": proj})
    client = SiteClient(site)
    find = client.find

    def mangled(entity_type: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        rows = find(entity_type, *args, **kwargs)
        return [{**r, "code": 5} if entity_type == "Version" and r["id"] == bad["id"] else r for r in rows]

    client.find = mangled  # type: ignore[method-assign]
    Scanner(store, client).prime(["Version"])
    assert [r["id"] for r in replica_read(store, "Version", ["code"], False)] == [good["id"]]
    q = store.fetch_queue
    with store.engine.connect() as conn:
        assert [(r.entity_type, r.entity_id) for r in conn.execute(sa.select(q))] == [("Version", bad["id"])]
