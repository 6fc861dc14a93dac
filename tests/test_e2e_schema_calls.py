"""A field changed or deleted at SG through the proxy (``schema_field_update``,
``schema_field_delete``), which SG logs no event for: a real shotgun_api3 client through a real
proxy to the fake SG, and the ingester's schema re-read after it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import shotgun_api3

from .rig import SCRIPT, Rig


def outcome(call: Any) -> Any:
    """A read's entities, or its Fault as text (SG refuses a read naming a field it has not)."""
    try:
        return call()
    except shotgun_api3.Fault as exc:
        return f"Fault: {exc}"


def test_a_field_deleted_through_the_proxy_is_no_longer_served(tmp_path: Path, db_url: str) -> None:
    with Rig(tmp_path, db_url) as rig:
        sg, direct = rig.client(), rig.direct()
        read = lambda: sg.find("Shot", [["sg_cut_in", "greater_than", 1000]], ["code", "sg_cut_in"])  # noqa: E731
        rig.wait_hit(read, lambda r: len(r) > 0, script=SCRIPT)
        assert sg.schema_field_delete("Shot", "sg_cut_in") is not None
        expected = outcome(lambda: direct.find("Shot", [["sg_cut_in", "greater_than", 1000]], ["code", "sg_cut_in"]))
        assert isinstance(expected, str) and "sg_cut_in" in expected  # SG refuses it now
        assert outcome(read) == expected, "the replica still answers for a field SG deleted"
        rig.run("ingest-events", "--once")  # its schema re-read: the field is gone for good
        assert outcome(read) == expected


def test_a_field_changed_through_the_proxy_passes_until_the_ingester_reread_the_schema(
        tmp_path: Path, db_url: str) -> None:
    with Rig(tmp_path, db_url) as rig:
        sg = rig.client()
        read = lambda: sg.find("Shot", [["sg_cut_in", "greater_than", 1000]], ["code", "sg_cut_in"])  # noqa: E731
        rig.wait_hit(read, lambda r: len(r) > 0, script=SCRIPT)
        assert sg.schema_field_update("Shot", "sg_cut_in", {"description": "first frame"})
        before = rig.reads()
        read()
        assert rig.reads() == before + 1  # passed: its definition changed, what else did is SG's to say
        rig.run("ingest-events", "--once")  # the schema re-read: still a number, read again and primed
        time.sleep(1.1)  # the proxy's marker clears at the first poll a second after it (pending.MARGIN) ...
        rig.run("ingest-events", "--once")  # ... the next run's

        def served() -> bool:  # a hit: SG served no read for it (wait_hit counts the reader client's)
            reads = rig.reads()
            return len(read()) > 0 and rig.reads() == reads

        rig.wait(served, what="the field served again after the schema re-read")
