"""Two clients write the same entity at once through the proxy, and SG's answers cross on the way
back: the answer learnt last is the older one. A real shotgun_api3 client per writer, mitmdump,
the fake SG holding the first write's answer until the second was answered."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from .rig import Rig
from .wait import wait_until


def test_the_older_of_two_crossing_answers_is_never_served(tmp_path: Path, db_url: str) -> None:
    with Rig(tmp_path, db_url) as rig:
        first, second, direct = rig.client(), rig.client(), rig.direct()
        shot = direct.find_one("Shot", [], ["code"])
        where = [["id", "is", shot["id"]]]
        for sg in (first, second):
            sg.find_one("Project", [])  # unseen credentials pass once; SG accepting them enables hits
        before = rig.reads()
        assert second.find_one("Shot", where, ["code"])["code"] == shot["code"]
        assert rig.reads() == before  # a hit: the replica answers reads of Shot.code
        release = rig.server.hold_next_answer("update")
        answers: list[Any] = []
        writer = threading.Thread(target=lambda: answers.append(first.update("Shot", shot["id"], {"code": "first"})))
        writer.start()
        try:
            wait_until(lambda: direct.find_one("Shot", where, ["code"])["code"] == "first", 20,
                       "SG applying the first write")
            second.update("Shot", shot["id"], {"code": "second"})  # applied after it, answered before it
        finally:
            release.set()
            writer.join(60)
        assert answers and answers[0]["code"] == "first"
        assert direct.find_one("Shot", where, ["code"])["code"] == "second"
        reads_before = rig.reads()
        for sg in (first, second):
            assert sg.find_one("Shot", where, ["code"])["code"] == "second"
        # the proxy did not store the older answer: those reads went to SG (no ingester here to
        # clear the markers), and no read answered "first" from the replica
        assert rig.reads() > reads_before
