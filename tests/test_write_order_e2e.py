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


def test_a_write_overtaken_through_the_other_side_of_its_pair_is_never_served(tmp_path: Path, db_url: str) -> None:
    """Proxy A sends ``Shot.sg_sequence = SQ02`` (SG applies it, its answer waits); meanwhile proxy B
    sets ``Sequence SQ02.shots`` to ``[]``, which SG applies after A's write (the Shot leaves SQ02
    again) and answers first. B's answer is learnt first (the replica's SQ02 did not hold the Shot
    yet), then A's. Before: A's learn checked only the rows it wrote itself (the Shot) against the
    rows proxies wrote meanwhile (SQ02), so it stored its answer and applied its pair: the replica
    said the Shot is in SQ02, and both writers read that back (hits) where SG says it is in none."""
    with Rig(tmp_path, db_url) as rig:
        proxy_b = rig.start_proxy()
        a, b, direct = rig.client(), rig.client(proxy_b), rig.direct()
        shot = direct.find_one("Shot", [["code", "is", "sh070"]], ["sg_sequence"])
        assert shot["sg_sequence"] is None
        seq = direct.find_one("Sequence", [["code", "is", "SQ02"]], ["shots"])
        assert seq["shots"]
        for sg in (a, b):
            sg.find_one("Project", [])  # unseen credentials pass once; SG accepting them enables hits
        reads = [("Shot", [["id", "is", shot["id"]]], ["sg_sequence"]),
                 ("Sequence", [["id", "is", seq["id"]]], ["shots"])]
        before = rig.reads()
        for sg in (a, b):
            for read in reads:
                sg.find(*read)
        assert rig.reads() == before, "hits to begin with"
        release = rig.server.hold_next_answer("update")
        answers: list[Any] = []
        link = {"type": "Sequence", "id": seq["id"]}
        writer = threading.Thread(target=lambda: answers.append(a.update("Shot", shot["id"], {"sg_sequence": link})))
        writer.start()
        try:
            wait_until(lambda: direct.find_one("Shot", [["id", "is", shot["id"]]], ["sg_sequence"])["sg_sequence"],
                       20, "SG applying A's write")
            b.update("Sequence", seq["id"], {"shots": []})  # applied after it, answered before it
        finally:
            release.set()
            writer.join(60)
        assert answers and answers[0]["sg_sequence"]["id"] == seq["id"]
        expected = [direct.find(*read) for read in reads]
        assert expected[0][0]["sg_sequence"] is None and expected[1][0]["shots"] == []
        for name, sg in (("A", a), ("B", b)):
            assert [sg.find(*read) for read in reads] == expected, f"proxy {name} served the older answer's pair"


def test_a_read_back_overtaken_through_the_other_side_of_its_pair_is_never_served(tmp_path: Path,
                                                                                   db_url: str) -> None:
    """Proxy A adds an Asset to a Shot's ``assets`` (a partial answer: A reads the row back from SG,
    and that read's answer is slow). After SG answered that read, proxy B removes the Shot from the
    Asset's ``shots`` (SG's pair takes the Asset out of the Shot's ``assets`` again), learnt before
    A stores its read-back. Before: A stored the read-back, older than B's write, since only the
    Shot's own row was checked against the rows proxies wrote meanwhile (B wrote the Asset's; the
    replica's Shot did not hold the link yet, so B's pair did not touch it): the replica put the
    Asset back in the Shot's ``assets``, and both writers read that back as a hit."""
    with Rig(tmp_path, db_url) as rig:
        proxy_b = rig.start_proxy()
        a, b, direct = rig.client(), rig.client(proxy_b), rig.direct()
        shot = direct.find_one("Shot", [["code", "is", "sh010"]], ["assets"])
        asset = direct.find_one("Asset", [["code", "is", "asset1"]], ["shots"])
        assert [x["id"] for x in shot["assets"]] != [] and asset["id"] not in [x["id"] for x in shot["assets"]]
        for sg in (a, b):
            sg.find_one("Project", [])  # unseen credentials pass once; SG accepting them enables hits
        read = ("Shot", [["id", "is", shot["id"]]], ["assets"])
        before = rig.reads()
        assert a.find(*read) == b.find(*read) == direct.find(*read) and rig.reads() == before + 1, "hits"
        link, back = {"type": "Asset", "id": asset["id"]}, {"type": "Shot", "id": shot["id"]}
        release = rig.server.hold_next_answer("read")  # A's read-back of the Shot
        reads_before = rig.reads()
        writer = threading.Thread(target=lambda: a.update("Shot", shot["id"], {"assets": [link]},
                                                          multi_entity_update_modes={"assets": "add"}))
        writer.start()
        try:
            wait_until(lambda: rig.reads() > reads_before, 20, "A reading the Shot back from SG")
            b.update("Asset", asset["id"], {"shots": [back]}, multi_entity_update_modes={"shots": "remove"})
        finally:
            release.set()
            writer.join(60)
        expected = direct.find(*read)
        assert [x["id"] for x in expected[0]["assets"]] == [x["id"] for x in shot["assets"]]
        for name, sg in (("A", a), ("B", b)):
            assert sg.find(*read) == expected, f"proxy {name} served the older read-back"
