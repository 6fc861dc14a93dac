"""The one write path (cache/replica/writes.py): upserts, so a row another writer inserted meanwhile is
updated rather than a unique-key error; only changed columns are written; the scanner's reconcile of
a type primed empty."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from cache.ingest import IngestConfig, Ingester
from cache.replica.store import Store
from cache.scan.scanner import Scanner

from .fakesg import FakeSite
from .replica import SiteClient, cached_schema, make_project, prime


@pytest.fixture
def site() -> FakeSite:
    return FakeSite.basic()


@pytest.fixture
def store(db_url: str, site: FakeSite) -> Iterator[Store]:
    st = Store.open(db_url, cached_schema(site))
    yield st
    st.dispose()


def shot_record(site: FakeSite, store: Store, shot_id: int) -> dict[str, Any]:
    return site.find_direct("Shot", [["id", "is", shot_id]], store.cached_field_names("Shot"))[0]


def rows(store: Store, table: sa.Table, *order: str) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(*[table.c[c] for c in order]))]


def test_rows_inserted_meanwhile_are_upserted(site: FakeSite, store: Store) -> None:
    """Between the batch's read and its flush another writer inserts the same entity row, links and
    registry rows (on PostgreSQL a concurrent commit is visible to the next statement): the flush
    updates them instead of failing on ``sg_shot_pkey`` and friends."""
    proj = make_project(site)
    asset = site.create_direct("Asset", {"code": "a1", "project": proj})
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj, "assets": [asset]})
    record = shot_record(site, store, shot["id"])
    with store.engine.begin() as conn:
        batch = store.batch(conn, "proxy")
        result = batch.put("Shot", [record], complete=True)
        assert result.inserted == 1
        conn.execute(store.tables["Shot"].insert().values(id=shot["id"], code="other writer", _retired=False))
        conn.execute(store.multi[("Shot", "assets")].insert().values(
            parent_id=shot["id"], child_type="Asset", child_id=asset["id"], pos=7))
        conn.execute(store.entities.insert().values(type="Shot", id=shot["id"], name="other", name_known=True,
                                                    retired=False))
        conn.execute(store.entities.insert().values(type="Asset", id=asset["id"], name_known=False,
                                                    retired=False))
        batch.queue(("Shot", shot["id"]), "test")
        conn.execute(store.fetch_queue.insert().values(entity_type="Shot", entity_id=shot["id"], reason="x",
                                                       queued_at=store.now()))
        batch.flush()
    (row,) = rows(store, store.tables["Shot"], "id")
    assert row["code"] == "sh1" and row["sg_sequence__id"] is None
    assert [(r["child_id"], r["pos"]) for r in rows(store, store.multi[("Shot", "assets")], "pos")] == [
        (asset["id"], 0)]
    names = {(r["type"], r["id"]): r["name"] for r in rows(store, store.entities, "type", "id")}
    assert names[("Shot", shot["id"])] == "sh1" and names[("Asset", asset["id"])] == "a1"
    assert [r["reason"] for r in rows(store, store.fetch_queue, "entity_id")] == ["test"]


def test_an_update_writes_only_the_changed_columns(site: FakeSite, store: Store) -> None:
    """Two writers change two fields of one row from the same old state: both changes stay."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj, "sg_cut_in": 1})
    with store.engine.begin() as conn:
        store.write_entities(conn, "Shot", [shot_record(site, store, shot["id"])], "scan", complete=True)
    with store.engine.begin() as conn:
        batch = store.batch(conn, "event")
        batch.load([("Shot", shot["id"])])
        store.write_entities(conn, "Shot", [{"id": shot["id"], "sg_cut_in": 99}], "proxy")  # the other writer
        assert batch.write(("Shot", shot["id"]), {"code": "renamed"})
        batch.flush()
    (row,) = rows(store, store.tables["Shot"], "id")
    assert (row["code"], row["sg_cut_in"]) == ("renamed", 99)


def test_concurrent_inserts_of_one_row_never_collide(backend: str, site: FakeSite, store: Store) -> None:
    """PostgreSQL: two transactions insert the same new rows; the second waits for the first and
    updates. (SQLite serializes writers, so there the question does not arise.)"""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: concurrent write transactions")
    proj = make_project(site)
    shots = [site.create_direct("Shot", {"code": f"sh{i}", "project": proj}) for i in range(20)]
    records = [shot_record(site, store, s["id"]) for s in shots]
    errors: list[BaseException] = []
    started = threading.Barrier(2)

    def writer(order: list[dict[str, Any]], source: str) -> None:
        try:
            with store.engine.begin() as conn:
                batch = store.batch(conn, source)
                batch.put("Shot", order, complete=True)
                started.wait(10)  # both have read the table: neither saw the other's rows
                batch.flush()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(records, "proxy")),
               threading.Thread(target=writer, args=(list(reversed(records)), "event"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [r["code"] for r in rows(store, store.tables["Shot"], "id")] == [f"sh{i}" for i in range(20)]


def test_reconcile_reads_a_type_primed_empty(site: FakeSite, store: Store) -> None:
    """A type with no row when primed has no watermark; rows created later without events are found."""
    client = SiteClient(site)
    make_project(site)
    scanner = Scanner(store, client)
    scanner.prime(sorted(store.schema.entities))
    assert scanner.primed_types()["Playlist"] is None
    site.events_enabled = False
    playlist = site.create_direct("Playlist", {"code": "silent"})
    site.events_enabled = True
    scans = {s.entity_type: s for s in scanner.reconcile(sorted(store.schema.entities))}
    assert scans["Playlist"].inserted == 1
    assert [r["code"] for r in rows(store, store.tables["Playlist"], "id")] == ["silent"]
    assert scanner.primed_types()["Playlist"] == site.find_direct(
        "Playlist", [["id", "is", playlist["id"]]], ["updated_at"])[0]["updated_at"]


def test_an_older_event_never_overwrites_a_newer_proxy_write(site: FakeSite, store: Store) -> None:
    """The proxy learned ``v2``; the ingester then sees the event of the earlier ``v1`` write (the
    ``v2`` event not visible yet): the row is neither at the event's old nor at its new value, so
    the ingester fetches SG's row instead of writing ``v1`` back."""
    client = SiteClient(site)
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "v0", "project": proj})
    prime(store, client)
    ing = Ingester(store, client, IngestConfig(batch=50, poll_interval=0.01))
    try:
        site.update_direct("Shot", shot["id"], {"code": "v1"})
        site.hold_event_ids(1)
        site.update_direct("Shot", shot["id"], {"code": "v2"})  # its event is not visible yet
        with store.write_engine.begin() as conn:
            store.write_entities(conn, "Shot", [{"id": shot["id"], "code": "v2"}], "proxy")
        ing.poll_once()
        (row,) = rows(store, store.tables["Shot"], "id")
        assert row["code"] == "v2"
        assert [(r["entity_type"], r["entity_id"]) for r in rows(store, store.fetch_queue, "entity_id")] == [
            ("Shot", shot["id"])]  # reads of Shot pass until SG's row is read
        ing.process_fetch_queue()
        site.release_held()
        ing.poll_once()
        (row,) = rows(store, store.tables["Shot"], "id")
        assert row["code"] == "v2" and not rows(store, store.fetch_queue, "entity_id")
    finally:
        ing.close()


def multi_of(store: Store, entity_type: str, entity_id: int, fname: str) -> list[tuple[str, int]]:
    table = store.multi[(entity_type, fname)]
    with store.engine.connect() as conn:
        return [(r.child_type, r.child_id) for r in conn.execute(
            sa.select(table).where(table.c.parent_id == entity_id).order_by(table.c.pos))]


def test_a_read_that_hides_a_retired_link_keeps_it_for_the_revival(site: FakeSite, store: Store) -> None:
    """SG leaves links to retired entities out of what it shows and shows them again on revival
    (no event says so): a fetch or scan of the row while one is retired must not drop it."""
    proj = make_project(site)
    assets = [site.create_direct("Asset", {"code": f"a{i}", "project": proj}) for i in range(3)]
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj, "assets": assets})
    with store.engine.begin() as conn:
        store.write_entities(conn, "Asset", [site.find_direct("Asset", [["id", "is", a["id"]]],
                                                              store.cached_field_names("Asset"))[0] for a in assets],
                             "scan", complete=True)
        store.write_entities(conn, "Shot", [shot_record(site, store, shot["id"])], "scan", complete=True)
    site.delete_direct("Asset", assets[1]["id"])
    with store.engine.begin() as conn:
        store.set_retired(conn, "Asset", assets[1]["id"], True, "event")
        shown = shot_record(site, store, shot["id"])
        assert [a["id"] for a in shown["assets"]] == [assets[0]["id"], assets[2]["id"]]  # SG hides it
        store.write_entities(conn, "Shot", [shown], "fetch", complete=True)
    assert multi_of(store, "Shot", shot["id"], "assets") == [("Asset", a["id"]) for a in assets]  # kept, in place
    site.revive_direct("Asset", assets[1]["id"])
    assert [a["id"] for a in shot_record(site, store, shot["id"])["assets"]] == [a["id"] for a in assets]


def test_an_added_event_for_a_link_already_held_leaves_sgs_order(site: FakeSite, store: Store) -> None:
    """Two proxies learned links in the opposite order to SG's: the events, applied in SG's order,
    move them to the end one after the other; the same event again changes nothing."""
    proj = make_project(site)
    shot = site.create_direct("Shot", {"code": "sh1", "project": proj})
    with store.engine.begin() as conn:
        store.write_entities(conn, "Shot", [shot_record(site, store, shot["id"])], "scan", complete=True)
        key = ("Shot", shot["id"])
        batch = store.batch(conn, "proxy")
        batch.change_links(key, "assets", [{"type": "Asset", "id": 2}], [])  # learned first
        batch.change_links(key, "assets", [{"type": "Asset", "id": 1}], [])
        batch.flush()
        batch = store.batch(conn, "event")
        assert batch.change_links(key, "assets", [{"type": "Asset", "id": 1}], []) is False  # already last
        assert batch.change_links(key, "assets", [{"type": "Asset", "id": 2}], []) is True  # SG added it later
        assert batch.change_links(key, "assets", [{"type": "Asset", "id": 2}], []) is False
        batch.flush()
    assert multi_of(store, "Shot", shot["id"], "assets") == [("Asset", 1), ("Asset", 2)]
