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
        direct = rig.direct()
        late = direct.create("Shot", {"code": "a<c", "project": proj})  # reaches the replica by the ingester
        assert direct.find_one("Shot", [["id", "is", late["id"]]], ["code"])["code"] == "a<c"
        assert rig.reader is not None
        for entity_type, filters, fields, order in READS:
            expected = direct.find(entity_type, filters, fields, order=order)
            assert expected, (filters, order)

            def read(t: str = entity_type, f: list = filters, r: list = fields, o: list | None = order) -> list:
                return rig.reader.find(t, f, r, order=o)  # type: ignore[union-attr]

            assert rig.wait_hit(read, lambda answer, e=expected: answer == e)
        assert len(direct.find("Shot", [["code", "contains", "&lt;"]])) == 2  # SG's stored text
