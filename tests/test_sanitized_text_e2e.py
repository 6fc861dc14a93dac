"""SG stores a ``<`` written to a text field as ``&lt;`` (its input sanitization) and sends it so;
shotgun_api3 turns ``&lt;`` back into ``<`` at the top level of each record it returns
(``Shotgun._parse_records``). The replica must hold what SG sends, not what the library makes of
it: the scanner and the ingester read SG through shotgun_api3, and a replica holding ``<`` sorts
and matches those rows otherwise than SG. A fake site that sanitizes, ``scripts/scan --full``,
the ingester, mitmdump, and real clients through the proxy and direct."""

from __future__ import annotations

from pathlib import Path

from .fakesg import FakeSite
from .rig import Rig

READS = [
    ("Shot", [], ["code"], [{"field_name": "code", "direction": "asc"}]),
    ("Shot", [["code", "contains", "&lt;"]], ["code"], None),
    ("Shot", [["code", "starts_with", "a&"]], ["code"], None),
]


def test_text_sg_sanitized_reads_through_the_proxy_as_direct(tmp_path: Path, db_url: str) -> None:
    site = FakeSite.basic()
    site.deviations.add("sanitizes-lt")
    proj = site.create_direct("Project", {"name": "P"})
    for code in ("a<b", "a-b", "a=b", "ab"):
        site.create_direct("Shot", {"code": code, "project": proj})
    with Rig(tmp_path, db_url, site, ingester=True, poll_interval=0.2) as rig:
        client, direct = rig.client(), rig.direct()
        client.find_one("Project", [])  # unseen credentials pass once
        late = direct.create("Shot", {"code": "a<c", "project": proj})  # through the ingester's fetch
        rig.wait(lambda: rig.caught_up() and rig.state("event_high") and True, what="the ingester")
        rig.wait(lambda: len(client.find("Shot", [], ["code"])) == 5, what="the new Shot in the replica")
        for entity_type, filters, fields, order in READS:
            expected = direct.find(entity_type, filters, fields, order=order)
            assert expected, (filters, order)
            got = rig.wait_hit(lambda f=filters, o=order: rig.reader.find(entity_type, f, fields, order=o),
                               lambda answer, e=expected: answer == e)
            assert got
        assert direct.find_one("Shot", [["id", "is", late["id"]]], ["code"])["code"] == "a<c"
