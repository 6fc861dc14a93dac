"""date_time values written by the sidecars on a host whose local time zone has daylight saving.

By default shotgun_api3 turns every ``YYYY-MM-DDTHH:MM:SSZ`` it receives into the host's local
time (``sgtimezone.LocalTimezone``, its offset found with ``mktime`` from the wall-clock time):
for an instant in the hour the clocks repeat in the autumn, the way back to UTC landed an hour off
and the replica stored, and served, a value SG never had. The sidecars' client keeps SG's UTC
(cache/config.py ``connect_site``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .fakesg import FakeSite
from .replica import site_differences
from .rig import KEY, SCRIPT, Rig

RULES = "+*\n-*.image\n-EventLogEntry\n"

#: Instants inside the repeated hour of each zone's autumn change (and one far from any change).
CASES = [
    ("America/New_York", "2024-11-03T05:30:00Z"),  # 01:30 EDT: 01:30 happens twice that night
    ("Europe/London", "2024-10-27T00:30:00Z"),  # 01:30 BST (01:30 GMT follows an hour later)
]


@pytest.mark.parametrize(("zone", "instant"), CASES)
def test_scan_and_ingester_in_a_dst_zone_keep_date_times(tmp_path: Path, db_url: str, zone: str, instant: str) -> None:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    project = site.create_direct("Project", {"name": "P"})
    shot = site.create_direct("Shot", {"code": "sh010", "sg_last_review": instant,
                                       "project": {"type": "Project", "id": project["id"]}})
    with Rig(tmp_path, db_url, site, rules=RULES, prime=None, proxy=False) as rig:
        rig.run("scan", "--full", "--quiet", TZ=zone)  # the scanner's host is in ``zone``
        row = site.find_direct("Shot", [["id", "is", shot["id"]]], ["sg_last_review"])[0]
        assert row["sg_last_review"] == instant
        with rig.store.engine.connect() as conn:
            stored = conn.exec_driver_sql(
                f"SELECT sg_last_review FROM sg_shot WHERE id = {shot['id']}").scalar_one()
        assert stored == instant, f"SG has {instant}, the replica serves {stored}"
        assert not site_differences(rig.store, site)
        # the ingester, on such a host: an event's new value and the row it fetches
        site.update_direct("Shot", shot["id"], {"sg_last_review": None})
        site.update_direct("Shot", shot["id"], {"sg_last_review": instant})
        other = site.create_direct("Shot", {"code": "sh020", "sg_last_review": instant,
                                            "project": {"type": "Project", "id": project["id"]}})
        rig.run("ingest-events", "--once", TZ=zone)
        with rig.store.engine.connect() as conn:
            stored = dict(conn.exec_driver_sql("SELECT id, sg_last_review FROM sg_shot").all())
        assert stored == {shot["id"]: instant, other["id"]: instant}
        assert not site_differences(rig.store, site)
