"""16 clients writing through the proxy while the ingester runs (fake SG server, scan --full,
scripts/ingest-events, mitmdump; a real shotgun_api3 client per writer).

The proxy learns every write's answer while the ingester applies the same writes' events and
fetches the new rows: the same rows are written by both at the same moment. No unique-key error
or rolled-back poll may show in either log, and once the writers stop and the ingester has caught
up, every cached type reads from the replica exactly as from the fake SG.

``SGCACHE_STRESS_SECONDS`` sets how long the writers write (default 60; CI runs it four times, shorter);
whatever the duration, every kind of operation must have been done at least once per writer on average.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .fakesg import FakeSite
from .replica import site_differences
from .rig import Rig
from .wait import wait_until

WRITERS = 16
SECONDS = float(os.environ.get("SGCACHE_STRESS_SECONDS", "60"))
BAD_LOG_LINES = ("UniqueViolation", "duplicate key", "IntegrityError", "UNIQUE constraint failed", "deadlock",
                 "applying a batch failed", "database error", "could not record")


@pytest.fixture
def rig(tmp_path: Path, db_url: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    proj = site.create_direct("Project", {"name": "Busy"})
    shots = [site.create_direct("Shot", {"code": f"sh{i:03d}", "project": proj}) for i in range(4)]
    for shot in shots:
        site.create_direct("Task", {"content": "comp", "project": proj, "entity": shot})
    # learning waits for the database as long as it takes (sgcache_write_wait=0): on a busy test machine
    # a learn can take more than the 2 s default, and is then deferred (correct, but what this test
    # checks is that every answer is learnt without an error)
    with Rig(tmp_path, db_url, site, ingester=True, poll_interval=0.2, ingest_args=("--gap-timeout", "10"),
             proxy=["sgcache_write_wait=0"]) as r:
        yield r


#: How much longer than SGCACHE_STRESS_SECONDS the writers may take to do every kind WRITERS times.
MAX_EXTRA = 120.0
#: What a writer does; the test checks every kind was done, however short the run (SGCACHE_STRESS_SECONDS).
KINDS = ("create Note", "update Shot", "create Task", "update Task", "delete (and revive) Note",
         "add to a multi-entity", "batch", "read")


def writer(rig: Rig, n: int, until: float, errors: list[str], counts: collections.Counter[str],
           lock: threading.Lock) -> None:
    """Creates, updates, deletes and reads, mostly of a few shared rows, until ``until`` and until every
    kind of operation was done WRITERS times (on a slow machine that takes longer than ``until``)."""
    sg = rig.client()
    rnd = random.Random(n)
    proj = {"type": "Project", "id": rig.site.find_direct("Project", [], ["id"])[0]["id"]}
    shots = [{"type": "Shot", "id": s["id"]} for s in rig.site.find_direct("Shot", [], ["id"])]
    tasks = [{"type": "Task", "id": t["id"]} for t in rig.site.find_direct("Task", [], ["id"])]
    mine: list[dict[str, Any]] = []
    i = 0

    def more() -> bool:
        if time.monotonic() < until:
            return True
        with lock:
            return any(counts[kind] < WRITERS for kind in KINDS) and time.monotonic() < until + MAX_EXTRA

    while more():
        i += 1
        op = rnd.randrange(8)
        if op == 4 and not mine:
            op = 7  # nothing of this writer's to delete yet: read instead
        try:
            if op == 0:
                note = sg.create("Note", {"subject": f"w{n}-{i}", "project": proj, "note_links": [rnd.choice(shots)],
                                          "tasks": [rnd.choice(tasks)]})
                mine.append(note)
            elif op == 1:
                sg.update("Shot", rnd.choice(shots)["id"], {"description": f"w{n}-{i}", "sg_cut_in": i})
            elif op == 2:
                task = sg.create("Task", {"content": f"w{n}-{i}", "project": proj, "entity": rnd.choice(shots)})
                tasks.append({"type": "Task", "id": task["id"]})
            elif op == 3:
                sg.update("Task", rnd.choice(tasks)["id"], {"sg_status_list": rnd.choice(["wtg", "ip", "fin"])})
            elif op == 4:
                note = mine.pop(rnd.randrange(len(mine)))
                sg.delete("Note", note["id"])
                if rnd.random() < 0.5:
                    sg.revive("Note", note["id"])
            elif op == 5:
                sg.update("Shot", rnd.choice(shots)["id"], {"assets": [], "tasks": [rnd.choice(tasks)]},
                          multi_entity_update_modes={"tasks": "add"})
            elif op == 6:
                sg.batch([{"request_type": "create", "entity_type": "Note",
                           "data": {"subject": f"b{n}-{i}", "project": proj, "note_links": [rnd.choice(shots)]}},
                          {"request_type": "update", "entity_type": "Shot", "entity_id": rnd.choice(shots)["id"],
                           "data": {"sg_status_list": rnd.choice(["ip", "fin", "wtg"])}}])
            else:
                sg.find("Shot", [["project", "is", proj]], ["code", "description", "sg_cut_in", "tasks"])
                sg.find("Note", [["note_links", "in", shots]], ["subject", "tasks"], limit=20)
            with lock:
                counts[KINDS[op]] += 1
        except Exception as exc:  # noqa: BLE001 - collected and reported by the test
            errors.append(f"writer {n} op {op}: {type(exc).__name__}: {exc}")
            if len(errors) > 20:
                return


def test_sixteen_writers_and_the_ingester(rig: Rig) -> None:
    errors: list[str] = []
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    until = time.monotonic() + SECONDS
    threads = [threading.Thread(target=writer, args=(rig, n, until, errors, counts, lock)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + MAX_EXTRA + 120)
    # a write whose answer was lost: the proxy logs why (which connection broke, and how)
    assert not errors, errors[:5] + rig.proxy.lines_with("but no answer came back")[:5]
    # every kind of operation was done, by many writers at once (the pairs of every kind collide)
    assert all(counts[kind] >= WRITERS for kind in KINDS), dict(counts)
    info = rig.reader.info()["sgcache"]
    deadline = time.monotonic() + 120
    rig.wait(rig.caught_up, timeout=120, what="the ingester to catch up")
    # the last fetches may still be landing
    wait_until(lambda: not site_differences(rig.store, rig.site), deadline - time.monotonic(),
               "the replica to equal the site", pause=0.5,
               detail=lambda: "\n".join(site_differences(rig.store, rig.site)) + "\n" + rig.ingest_log()[-3000:])
    logs = {"mitmdump.log": rig.proxy.output(), "ingest.log": rig.ingest_log()}
    for name, text in logs.items():
        bad = [line for line in text.splitlines() if any(b in line for b in BAD_LOG_LINES)]
        assert not bad, f"{name}: {bad[:5]}"
    print(f"\n{sum(counts.values())} operations {dict(counts)}; proxy hits {info['hits']}, passes {info['passes']}")
