"""In-process helpers around a replica and the fake site: no HTTP, no subprocess.

:class:`SiteClient` serves ``find``/``schema_read`` from a :class:`FakeSite` as ``shotgun_api3``
would; :func:`prime` is a minimal full scan; :func:`sync` polls an :class:`Ingester` until it
caught up; :func:`assert_equal_to_site` compares every cached type of the replica with the site.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import sqlalchemy as sa

from cache.ingest import Ingester
from cache.read import Reader, ReplicaState
from cache.replica import fetchqueue
from cache.replica.schema import Schema, parse_rules
from cache.replica.statekeys import EVENT_CURSOR as K_CURSOR
from cache.replica.store import Store

from .fakesg import FakeSite
from .paths import RULES


class SiteClient:
    """``shotgun_api3.Shotgun``'s find/schema_read, served by a FakeSite without HTTP."""

    def __init__(self, site: FakeSite):
        self.site = site
        self.calls: list[tuple[str, Any]] = []

    def find(self, entity_type: str, filters: Any, fields: list[str] | None = None,
             order: list[dict[str, str]] | None = None, filter_operator: str | None = None,
             limit: int = 0, retired_only: bool = False) -> list[dict[str, Any]]:
        self.calls.append((entity_type, filters))
        rows = self.site.find_direct(entity_type, filters, fields, order, filter_operator or "all",
                                     retired_only=retired_only)
        return rows[:limit] if limit else rows

    def schema_read(self) -> dict[str, Any]:
        return self.site._direct("schema_read", None, False)


def cached_schema(site: FakeSite) -> Schema:
    """The cached subset of the site's schema, by the project's rules."""
    return Schema.from_schema_read(site.schema).brief().filtered(parse_rules(RULES.read_text()))


def make_project(site: FakeSite) -> dict[str, Any]:
    return site.create_direct("Project", {"name": "Demo"})


def prime(store: Store, client: SiteClient) -> None:
    """A minimal full scan: every row of every cached type, then the cursor at the newest event."""
    with store.engine.begin() as conn:
        store.set_state(conn, K_CURSOR, client.site.last_event_id())
        for entity_type, entity in store.schema.entities.items():
            fields = [f for f in entity.fields if f in client.site.schema[entity_type]]
            for retired in (False, True):
                rows = client.find(entity_type, [], fields, retired_only=retired)
                store.write_entities(conn, entity_type, rows, "scan", complete=True, retired=retired)
            store.mark_primed(conn, entity_type)


def sync(ing: Ingester, max_polls: int = 100) -> int:
    """Poll until caught up (fetches and schema work included, and the rows a fetch held back for
    the next poll stored); returns the number of polls."""
    for n in range(1, max_polls + 1):
        result = ing.poll_once()
        ing.process_fetch_queue()
        ing.process_schema()
        if not result.full:
            if not _held_for_a_poll(ing.store):
                return n
            time.sleep(0.05)  # a held row is read again once a poll started pending.MARGIN after it
    raise AssertionError("ingester never caught up")


def _held_for_a_poll(store: Store) -> bool:
    """Whether a fetch held rows back until the next poll (cache/ingest/fetch.py)."""
    q = store.fetch_queue
    with store.engine.connect() as conn:
        return conn.execute(sa.select(q.c.entity_id).where(q.c.reason == fetchqueue.LINK_LEFT_OUT).limit(1)).first() is not None


def state(store: Store, key: str) -> Any:
    """One value of the replica's state table."""
    with store.engine.connect() as conn:
        return store.get_state(conn, key)


#: Rows per page of :func:`replica_read` (SG's largest page).
PAGE = 500


def replica_read(store: Store, entity_type: str, fields: list[str], retired: bool) -> list[dict[str, Any]]:
    """Every active (or retired) row of a type, id ascending, as the read engine answers it, page by
    page as a client pages (in one snapshot)."""
    rows: list[dict[str, Any]] = []
    reader = Reader(store)
    with store.engine.connect() as conn, conn.begin():
        replica_state = ReplicaState(store.primed_fields(conn))
        for page in itertools.count(1):
            params = {"type": entity_type, "return_fields": fields,
                      "filters": {"logical_operator": "and", "conditions": []},
                      "sorts": [{"field_name": "id", "direction": "asc"}],
                      "paging": {"entities_per_page": PAGE, "current_page": page},
                      "return_only": "retired" if retired else "active"}
            entities = reader.read(conn, params, replica_state)["entities"]
            rows.extend(entities)
            if len(entities) < PAGE:
                return rows
    raise AssertionError("unreachable")


def site_differences(store: Store, site: FakeSite) -> list[str]:
    """Every cached type (active and retired rows, every primed field) where the replica does not read
    as SG, each with its first differing row."""
    with store.engine.connect() as conn:
        primed = store.primed_fields(conn)
    found = []
    for entity_type in store.schema.entities:
        fields = sorted(f for f in primed.get(entity_type, ()) if f != "id")
        for retired in (False, True):
            ours = replica_read(store, entity_type, fields, retired)
            theirs = site.find_direct(entity_type, [], fields, [{"field_name": "id", "direction": "asc"}],
                                      retired_only=retired)
            if ours != theirs:
                found.append(f"{entity_type} (retired={retired}) differs: {_first_difference(ours, theirs)}")
    return found


def assert_equal_to_site(store: Store, site: FakeSite) -> None:
    """Every cached type, active and retired rows, every primed field: the replica reads as SG."""
    differences = site_differences(store, site)
    assert not differences, "\n".join(differences)


def _first_difference(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str:
    """The first row that differs, replica then site (by id), for a readable failure."""
    by_id = {row["id"]: row for row in theirs}
    for row in ours:
        site_row = by_id.get(row["id"])
        if site_row is None:
            return f"{row['type']} {row['id']} is not at the site"
        fields = {f: (row.get(f), site_row.get(f)) for f in row.keys() | site_row.keys() if row.get(f) != site_row.get(f)}
        if fields:
            return f"{row['type']} {row['id']}, field: (replica, site): {fields!r}"
    missing = sorted(set(by_id) - {row["id"] for row in ours})
    return f"rows missing from the replica: {missing[:10]}"
