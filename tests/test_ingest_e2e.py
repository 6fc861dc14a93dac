"""scripts/ingest-events as a subprocess against the fake SG server."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cache.replica.statekeys import EVENT_CURSOR as K_CURSOR
from cache.replica.statekeys import EVENT_HIGH as K_HIGH
from cache.replica.statekeys import INGESTER_LEADER as K_LEADER
from cache.replica.store import Store

from .fakesg import FakeSite
from .paths import REPO, SCRIPTS
from .replica import assert_equal_to_site
from .rig import Rig

INGEST = SCRIPTS / "ingest-events"


@pytest.fixture
def rig(db_url: str, tmp_path: Path) -> Iterator[Rig]:
    """The fake SG server and a primed replica; each test starts its ingesters (quick polls, short gaps,
    the ingester's own idle back-off)."""
    with Rig(tmp_path, db_url, FakeSite.basic(), prime="direct", proxy=False, poll_interval=0.05,
             idle_backoff=True, ingest_args=("--gap-timeout", "1", "--lock-retry", "0.2")) as r:
        yield r


def workload(site: FakeSite, rng: random.Random, n: int, pace: float = 0.0) -> None:
    """``n`` mixed changes: creates, scalar and link updates, multi_entity add/remove, retire/revive."""
    proj = site.create_direct("Project", {"name": "Demo"})
    shots: list[dict[str, Any]] = []
    assets: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    retired: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        time.sleep(pace)
        roll = rng.random()
        if roll < 0.15 or len(shots) < 3:
            shots.append(site.create_direct("Shot", {"code": f"sh{i}", "project": proj}))
        elif roll < 0.25 or len(assets) < 3:
            assets.append(site.create_direct("Asset", {"code": f"as{i}", "project": proj}))
        elif roll < 0.32:
            tasks.append(site.create_direct("Task", {"content": f"t{i}", "project": proj,
                                                     "entity": rng.choice(shots)}))
        elif roll < 0.55:
            site.update_direct("Shot", rng.choice(shots)["id"],
                               {"code": f"c{i}", "sg_cut_in": rng.randint(0, 2000)})
        elif roll < 0.68:
            mode = rng.choice(["add", "remove", "set"])
            site.update_direct("Shot", rng.choice(shots)["id"], {"assets": rng.sample(assets, 2)},
                               modes={"assets": mode})
        elif roll < 0.78 and tasks:
            site.update_direct("Task", rng.choice(tasks)["id"], {"entity": rng.choice(shots + assets)})
        elif roll < 0.86 and len(assets) > 4:
            victim = assets.pop(rng.randrange(len(assets)))
            site.delete_direct("Asset", victim["id"])
            retired.append(("Asset", victim))
        elif roll < 0.92 and retired:
            entity_type, back = retired.pop(rng.randrange(len(retired)))
            site.revive_direct(entity_type, back["id"])
            assets.append(back)
        elif roll < 0.95:
            site.add_noise_events()
        else:
            site.update_direct("Asset", rng.choice(assets)["id"], {"description": f"d{i}"})


def assert_applied_once(store: Store, site: FakeSite, since: int | None = None) -> None:
    """Every event is stored; no event changed the same field of the same entity twice. ``since``
    (a scan's cursor): exactly the events above it are stored, and there is at least one."""
    with store.engine.connect() as conn:
        stored = {r.id for r in conn.execute(sa.select(store.events.c.id).where(store.events.c.id > (since or 0)))}
        t = store.changes
        dupes = conn.execute(
            sa.select(t.c.event_id, t.c.entity_type, t.c.entity_id, t.c.field_name, sa.func.count())
            .where(t.c.source == "event")
            .group_by(t.c.event_id, t.c.entity_type, t.c.entity_id, t.c.field_name)
            .having(sa.func.count() > 1)
        ).all()
    if since is None:
        assert {e["id"] for e in site.events(0)} <= stored
    else:
        expected = {e["id"] for e in site.events(since)}
        assert expected, "no event since the scan: nothing was checked"
        assert expected == stored, (sorted(expected - stored), sorted(stored - expected))
    assert dupes == []


def test_follow_applies_every_kind_of_event(rig: Rig) -> None:
    proc = rig.start_ingester()
    site = rig.site
    template = site.add_task_template(7, "basic", [{"content": "layout"}, {"content": "anim"}])
    workload(site, random.Random(1), 60)
    site.create_direct("Shot", {"code": "templated", "task_template": template})
    rig.wait(rig.caught_up, what="catch-up")
    assert_equal_to_site(rig.store, site)
    assert_applied_once(rig.store, site)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_sigkill_at_random_points_then_restart(rig: Rig) -> None:
    rng = random.Random(42)
    writer = threading.Thread(target=workload, args=(rig.site, random.Random(7), 400, 0.005))
    proc = rig.start_ingester()
    writer.start()
    kills = 0
    while writer.is_alive() or kills < 5:
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        kills += 1
        proc = rig.start_ingester()
    writer.join()
    rig.wait(rig.caught_up, timeout=30, what="catch-up after kills")
    assert kills >= 5
    assert_equal_to_site(rig.store, rig.site)
    assert_applied_once(rig.store, rig.site)


def test_two_ingesters_on_postgresql(rig: Rig, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("the advisory-lock takeover needs PostgreSQL (SQLite refuses a second ingester)")
    first = rig.start_ingester()
    rig.wait(lambda: (rig.state(K_LEADER) or {}).get("pid") == first.pid, what="first leads")
    second = rig.start_ingester()
    rig.wait(lambda: "waiting for the leader lock" in second.output(), what="second waits")
    workload(rig.site, random.Random(3), 40)
    rig.wait(rig.caught_up, what="catch-up by the leader")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = time.monotonic()
    rig.wait(lambda: (rig.state(K_LEADER) or {}).get("pid") == second.pid, timeout=10, what="takeover")
    assert time.monotonic() - killed_at < 5
    workload(rig.site, random.Random(4), 40)
    rig.wait(rig.caught_up, what="catch-up by the new leader")
    assert_equal_to_site(rig.store, rig.site)
    assert_applied_once(rig.store, rig.site)


def test_second_ingester_on_sqlite_refuses(rig: Rig, backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("SQLite only: on PostgreSQL the second ingester waits for the lock")
    first = rig.start_ingester()
    rig.wait(lambda: (rig.state(K_LEADER) or {}).get("pid") == first.pid, what="first leads")
    second = rig.start_ingester()
    assert second.wait(timeout=20) == 3
    assert "another ingester" in second.output()
    assert first.poll() is None


def test_gaps_late_and_never(rig: Rig) -> None:
    site = rig.site
    shot = site.create_direct("Shot", {"code": "sh1"})
    rig.start_ingester()
    rig.wait(rig.caught_up, what="start")
    held = site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "late"})
    site.update_direct("Shot", shot["id"], {"description": "visible"})
    rig.wait(lambda: rig.state(K_HIGH) == site.last_event_id(), what="high mark")
    assert rig.state(K_CURSOR) == held[0] - 1
    site.release_held()
    rig.wait(rig.caught_up, what="late event")
    assert_equal_to_site(rig.store, site)
    lost = site.hold_event_ids(1)
    site.update_direct("Shot", shot["id"], {"code": "rolled back"})
    site.drop_held()
    site.update_direct("Shot", shot["id"], {"description": "after the hole"})
    rig.wait(lambda: rig.state(K_HIGH) == site.last_event_id(), what="high mark 2")
    rig.wait(lambda: rig.state(K_CURSOR) == site.last_event_id(), timeout=10, what="gap given up")
    assert "gave up on event ids" in rig.ingesters[0].output()
    assert str(lost[0]) in rig.ingesters[0].output()


def test_sg_down_then_back(rig: Rig) -> None:
    site = rig.site
    proc = rig.start_ingester()
    rig.wait(rig.caught_up, what="start")
    rig.server.stop_listening()
    shot = site.create_direct("Shot", {"code": "while down"})
    # Wait until the ingester has met the outage (an idle ingester polls only every 3 s): a fixed
    # sleep raced its back-off and failed about one run in three.
    rig.wait(lambda: "poll failed" in proc.output(), timeout=30, what="a poll failing while SG is down")
    assert proc.poll() is None
    rig.server.start()
    site.update_direct("Shot", shot["id"], {"code": "back"})
    rig.wait(rig.caught_up, timeout=30, what="recovery")
    assert_equal_to_site(rig.store, site)
    assert proc.poll() is None


def test_help_and_once(rig: Rig) -> None:
    out = subprocess.run([sys.executable, str(INGEST), "--help"], capture_output=True, text=True, check=True)
    for flag in ("--once", "--follow", "--poll-interval", "--gap-timeout", "--batch", "--db", "--site"):
        assert flag in out.stdout
    workload(rig.site, random.Random(5), 30)
    proc = rig.start_ingester("--once", "--batch", "7")
    assert proc.wait(timeout=30) == 0, proc.output()
    assert rig.caught_up()
    assert_equal_to_site(rig.store, rig.site)


def test_reprocess_retirement(rig: Rig) -> None:
    site = rig.site
    shot = site.create_direct("Shot", {"code": "sh1"})
    proc = rig.start_ingester()
    site.delete_direct("Shot", shot["id"])
    rig.wait(rig.caught_up, what="retirement")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    with rig.store.engine.begin() as conn:  # as if a bug had lost the retirement
        rig.store.set_retired(conn, "Shot", shot["id"], False, "scan")
    out = subprocess.run([sys.executable, str(SCRIPTS / "reprocess"), "--retirement", "--types", "Shot"],
                         env=rig.env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "replayed 2 stored events" in out.stderr
    assert_equal_to_site(rig.store, site)


def test_reprocess_refuses_while_an_ingester_leads(rig: Rig) -> None:
    proc = rig.start_ingester()
    rig.wait(lambda: rig.state(K_LEADER) is not None, what="leader")
    out = subprocess.run([sys.executable, str(SCRIPTS / "reprocess"), "--retirement"],
                         env=rig.env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert "stop it before reprocessing" in out.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
