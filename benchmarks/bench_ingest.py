"""Ingest benchmark: events applied per second on SQLite and PostgreSQL.

    python -m benchmarks.bench_ingest [--events 10000] [--pg URL] [--batch 500] [--catch-up-batch 2000]

A fake SG site (in-process) is driven through a mixed workload until it has written
the requested number of EventLogEntry rows (creates with their in_create Changes,
scalar and link updates, multi_entity add/remove with inverse-side events, retire and
revive, noise). The events, with the ``entity.<Type>.updated_at/by`` values the real
poll asks for, are pre-generated; the ingester then reads them in batches from an
in-memory client that also serves its fetches, so neither HTTP nor the fake's query
engine is measured. Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.support import DEFAULT_PG, drop_pg, pg_url  # noqa: E402
from cache.ingest import DEEP_FIELDS, IngestConfig, Ingester, NoLock, engine_options  # noqa: E402
from cache.replica.schema import Schema, parse_rules  # noqa: E402
from cache.replica.statekeys import EVENT_CURSOR as K_CURSOR  # noqa: E402
from cache.replica.store import Store  # noqa: E402
from tests.fakesg import FakeSite  # noqa: E402

RULES = REPO / "schema" / "basic-filters.txt"


class MemorySG:
    """Serves pre-generated events (``id > x`` / ``id in [...]``) and rows by id, like ``Shotgun.find``."""

    def __init__(self, events: list[dict[str, Any]], rows: dict[str, dict[int, dict[str, Any]]],
                 retired: dict[str, dict[int, dict[str, Any]]]):
        self.events = events
        self.ids = [e["id"] for e in events]
        self.rows = rows
        self.retired = retired
        self.calls = 0

    def find(self, entity_type: str, filters: Any, fields: list[str] | None = None,
             order: Any = None, filter_operator: Any = None, limit: int = 0,
             retired_only: bool = False) -> list[dict[str, Any]]:
        self.calls += 1
        if entity_type == "EventLogEntry":
            return self._events(filters, limit)
        table = (self.retired if retired_only else self.rows).get(entity_type, {})
        fname, _relation, values = filters[0]
        if fname != "id":  # a revival's link search: the rows whose link field holds one of ``values``
            return [{"type": entity_type, "id": i} for i, row in table.items() if _links_one_of(row.get(fname), values)]
        return [{f: table[i].get(f) for f in ["type", "id", *(fields or [])]} for i in values if i in table]

    def _events(self, filters: Any, limit: int) -> list[dict[str, Any]]:
        if not filters:
            return [self.events[-1]] if self.events else []
        flt = filters[0]
        if isinstance(flt, dict):  # open gaps: none in this stream
            flt = flt["filters"][1]
        start = bisect.bisect_right(self.ids, flt[2])
        return self.events[start:start + limit]

    def schema_read(self) -> dict[str, Any]:
        raise NotImplementedError


def _links_one_of(value: Any, wanted: list[dict[str, Any]]) -> bool:
    """Whether a link field's value (an entity dict, a list of them or None) holds one of ``wanted``."""
    keys = {(w["type"], w["id"]) for w in wanted}
    links = value if isinstance(value, list) else [value]
    return any(isinstance(x, dict) and (x.get("type"), x.get("id")) in keys for x in links)


def generate(n_events: int, seed: int = 1) -> tuple[FakeSite, list[dict[str, Any]]]:
    """Drive a fake site until it has written ``n_events`` events."""
    site = FakeSite.basic()
    rng = random.Random(seed)
    proj = site.create_direct("Project", {"name": "Bench"})
    shots: list[dict[str, Any]] = []
    assets: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    retired: list[dict[str, Any]] = []
    i = 0
    while site.last_event_id() < n_events:
        i += 1
        roll = rng.random()
        if roll < 0.06 or len(shots) < 5:
            shots.append(site.create_direct("Shot", {"code": f"sh{i}", "project": proj}))
        elif roll < 0.10 or len(assets) < 6:
            assets.append(site.create_direct("Asset", {"code": f"as{i}", "project": proj}))
        elif roll < 0.14:
            tasks.append(site.create_direct("Task", {"content": f"t{i}", "project": proj,
                                                     "entity": rng.choice(shots)}))
        elif roll < 0.62:
            site.update_direct("Shot", rng.choice(shots)["id"], {"code": f"c{i}", "sg_cut_in": i})
        elif roll < 0.72:
            site.update_direct("Shot", rng.choice(shots)["id"], {"assets": rng.sample(assets, 2)},
                               modes={"assets": rng.choice(["add", "remove"])})
        elif roll < 0.80 and tasks:
            site.update_direct("Task", rng.choice(tasks)["id"],
                               {"entity": rng.choice(shots), "sg_status_list": rng.choice(["ip", "fin"])})
        elif roll < 0.84 and len(assets) > 10:
            victim = assets.pop(rng.randrange(len(assets)))
            site.delete_direct("Asset", victim["id"])
            retired.append(victim)
        elif roll < 0.87 and retired:
            back = retired.pop()
            site.revive_direct("Asset", back["id"])
            assets.append(back)
        elif roll < 0.90:
            site.add_noise_events()
        else:
            site.update_direct("Asset", rng.choice(assets)["id"], {"description": f"d{i}"})
    events = [e for e in site.events(0) if e["id"] <= n_events]
    return site, events


def snapshot(site: FakeSite, schema: Schema) -> tuple[dict[str, Any], dict[str, Any]]:
    active: dict[str, dict[int, dict[str, Any]]] = {}
    retired: dict[str, dict[int, dict[str, Any]]] = {}
    for entity_type, entity in schema.entities.items():
        fields = sorted(entity.fields)
        active[entity_type] = {r["id"]: r for r in site.find_direct(entity_type, [], fields)}
        retired[entity_type] = {r["id"]: r for r in site.find_direct(entity_type, [], fields, retired_only=True)}
    return active, retired


def add_deep_fields(events: list[dict[str, Any]], rows: dict[str, dict[int, dict[str, Any]]]) -> None:
    """What the poll's ``entity.<Type>.updated_at/by`` return fields would carry."""
    for event in events:
        entity = event.get("entity")
        if not entity or entity["type"] not in rows:
            continue
        row = rows[entity["type"]].get(entity["id"])
        for fname in DEEP_FIELDS:
            if row is not None and fname in row:
                event[f"entity.{entity['type']}.{fname}"] = row[fname]


def run_backend(url: str, schema: Schema, sg: MemorySG, batch: int, catch_up: int) -> tuple[float, int, int]:
    """Time one ingest of the whole stream; returns (seconds, events, change-log rows)."""
    store = Store.open(url, schema, **engine_options(url))
    with store.engine.begin() as conn:
        store.set_state(conn, K_CURSOR, 0)
    ingester = Ingester(store, sg, IngestConfig(batch=batch, catch_up_batch=catch_up, poll_interval=0.0, sweep_every=0), lock=NoLock())
    start = time.perf_counter()
    ingester.run(follow=False)
    elapsed = time.perf_counter() - start
    with store.engine.connect() as conn:
        changes = conn.execute(sa.select(sa.func.count()).select_from(store.changes)).scalar_one()
        applied = conn.execute(sa.select(sa.func.count()).select_from(store.events)).scalar_one()
    ingester.close()
    store.dispose()
    return elapsed, int(applied), int(changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=IngestConfig.batch)
    parser.add_argument("--catch-up-batch", type=int, default=IngestConfig.catch_up_batch,
                        help="events per poll after a full poll (the ingester's default; --batch to turn it off)")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL base URL ('' to skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    site, events = generate(args.events)
    schema = Schema.from_schema_read(site.schema).brief().filtered(parse_rules(RULES.read_text()))
    active, retired = snapshot(site, schema)
    add_deep_fields(events, active)
    kinds: dict[str, int] = {}
    for e in events:
        kind = e["event_type"].rsplit("_", 1)[-1] if e["event_type"].startswith("Shotgun_") else "other"
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"generated {len(events)} events in {time.perf_counter() - t0:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    with tempfile.TemporaryDirectory() as tmp:
        backends = [("SQLite", f"sqlite:///{tmp}/bench.db", None)]
        if args.pg:
            made = pg_url(args.pg)
            if made:
                backends.append(("PostgreSQL", made[0], made[1]))
        for name, url, pg_schema in backends:
            try:
                sg = MemorySG(events, active, retired)
                elapsed, applied, changes = run_backend(url, schema, sg, args.batch, args.catch_up_batch)
                print(f"{name:<10} {applied} events in {elapsed:.2f}s = {applied / elapsed:,.0f} events/s "
                      f"({changes} change-log rows, {sg.calls} SG calls, batch {args.batch}, catch-up {args.catch_up_batch})")
            finally:
                if pg_schema:
                    drop_pg(args.pg, pg_schema)


if __name__ == "__main__":
    main()
