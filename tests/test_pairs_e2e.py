"""After a write through a proxy, every read through any proxy on the database gives SG's answer.

Processes: the fake SG (which keeps every standard pair in step and makes template Tasks),
``scripts/scan --full``, two mitmdump proxies on the same replica, and ``scripts/ingest-events
--once`` run when a test wants the ingester to catch up. Each write goes through proxy A;
the reads that its side effects change are made at once through proxy A and proxy B and
compared with a direct client to the fake. Then the ingester catches up and the same reads
must be cache hits (with the same answers).

The module runs in regular proxy mode; a representative subset (a create learned with its pair, a
template's pending Tasks, a batch, a lost answer) runs in reverse mode too, on a rig of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from .fakesg import FakeSite
from .proxyharness import Proxy
from .rig import READER, READER_KEY, RIG_OPTIONS, Rig
from .wait import wait_until

Read = tuple[str, list[Any], list[str]]

PROXY_MODES = ("regular",)
#: The tests that run in reverse mode too.
both_modes = pytest.mark.proxy_modes("regular", "reverse")


def populate_pairs(site: FakeSite) -> None:
    """A project, two sequences, six shots, assets, tasks, a version and a task template."""
    proj = site.create_direct("Project", {"name": "Pairs"})
    p = {"type": "Project", "id": proj["id"]}
    seqs = [site.create_direct("Sequence", {"code": f"SQ{i}", "project": p}) for i in (1, 2)]
    assets = [site.create_direct("Asset", {"code": f"asset{i}", "project": p}) for i in range(3)]
    for i in range(1, 7):
        site.create_direct("Shot", {"code": f"sh{i:02d}", "project": p,
                                    "sg_sequence": {"type": "Sequence", "id": seqs[i % 2]["id"]},
                                    "assets": [{"type": "Asset", "id": a["id"]} for a in assets[: i % 3]]})
    for i, code in enumerate(["sh05", "sh05", "sh01"]):
        shot = site.find_direct("Shot", [["code", "is", code]], ["id"])[0]
        site.create_direct("Task", {"content": f"task{i}", "project": p, "entity": {"type": "Shot", "id": shot["id"]}})
    shot5 = site.find_direct("Shot", [["code", "is", "sh05"]], ["id"])[0]
    site.create_direct("Version", {"code": "v001", "project": p, "entity": {"type": "Shot", "id": shot5["id"]}})
    site.add_task_template(7, "Basic shot", [{"content": "Layout"}, {"content": "Anim"}])


class TwoProxies:
    """A primed rig seen through two proxies on its database (A, the rig's own, and B), and the ingester on demand."""

    def __init__(self, rig: Rig, proxy_b: Proxy):
        self.rig, self.proxy_b = rig, proxy_b
        self.a = rig.client()
        self.b = rig.client(proxy_b)
        self.direct = rig.direct()
        for sg in (self.a, self.b):
            sg.find_one("Project", [])  # unseen credentials pass once; SG accepting them enables hits

    def ingest(self) -> None:
        """Let the ingester catch up with everything SG logged so far."""
        self.rig.run("ingest-events", "--once")

    def one(self, entity_type: str, code: str, field: str = "code") -> dict[str, Any]:
        return {"type": entity_type, "id": self.direct.find_one(entity_type, [[field, "is", code]])["id"]}

    def assert_sg_answers(self, reads: list[Read]) -> None:
        """Each read, through proxy A and proxy B, at once, gives the direct client's answer."""
        for entity_type, filters, fields in reads:
            expected = self.direct.find(entity_type, filters, fields)
            for name, sg in (("A", self.a), ("B", self.b)):
                got = sg.find(entity_type, filters, fields)
                assert got == expected, f"proxy {name}: {entity_type} {filters} {fields}"

    def assert_hits_after_ingest(self, reads: list[Read], timeout: float = 60.0) -> None:
        """Once the ingester has caught up, the reads are hits through both proxies, still SG's answers."""
        tries = 0

        def caught_up_and_hits() -> bool:
            nonlocal tries
            tries += 1
            if tries > 1 or not self.rig.caught_up():  # run the ingester unless it has every event already
                self.ingest()
            expected = [self.direct.find(t, f, fl) for t, f, fl in reads]
            before = self.rig.reads()
            got = [[sg.find(t, f, fl) for t, f, fl in reads] for sg in (self.a, self.b)]
            hits = self.rig.reads() == before
            assert got == [expected, expected]
            return hits

        wait_until(caught_up_and_hits, timeout, "the reads to be hits after the ingester caught up", pause=0,
                   detail=lambda: self.rig.proxy.output()[-3000:])


@pytest.fixture(scope="module")
def prig(tmp_path_factory: pytest.TempPathFactory, mode_db_url: str, proxy_mode: str) -> Iterator[TwoProxies]:
    tmp = tmp_path_factory.mktemp(f"pairs-{proxy_mode}")
    with Rig(tmp, mode_db_url, populate_site=populate_pairs, mode=proxy_mode) as rig:
        pr = TwoProxies(rig, rig.start_proxy(RIG_OPTIONS, workdir=tmp / "proxy-b"))
        pr.ingest()  # the cursor starts where the scan left it
        yield pr


def tasks_of(*shots: dict[str, Any]) -> list[Read]:
    return [("Shot", [["id", "is", s["id"]]], ["code", "tasks"]) for s in shots]


def check(prig: TwoProxies, write: Callable[[], Any], reads: list[Read], modelled: bool | None = True) -> Any:
    """Warm the reads (hits), write through proxy A, read at once through A and B, then catch up.

    ``modelled``: True, the proxy applies every effect of the write on these reads, so they are hits
    at once; False, it cannot know them, so they all pass; None, some of each."""
    prig.assert_hits_after_ingest(reads)
    result = write()
    expected = [prig.direct.find(t, f, fl) for t, f, fl in reads]
    before = prig.rig.reads()
    prig.assert_sg_answers(reads)
    passed = prig.rig.reads() - before - len(reads)  # assert_sg_answers asks the fake once per read
    if modelled:
        assert passed == 0, "a modelled effect was not applied: the reads passed"
    elif modelled is False:
        assert passed == 2 * len(reads), "an effect the proxy cannot know was served from the replica"
    assert expected == [prig.direct.find(t, f, fl) for t, f, fl in reads]
    prig.assert_hits_after_ingest(reads)
    return result


@both_modes
def test_create_task_shows_in_the_shots_tasks(prig: TwoProxies) -> None:
    shot5 = prig.one("Shot", "sh05")
    check(prig, lambda: prig.a.create("Task", {"content": "new", "entity": shot5}), tasks_of(shot5))


def test_move_task_between_shots(prig: TwoProxies) -> None:
    shot5, shot1 = prig.one("Shot", "sh05"), prig.one("Shot", "sh01")
    task = prig.one("Task", "task0", "content")
    reads = tasks_of(shot5, shot1) + [("Task", [["entity", "is", shot1]], ["content", "entity"])]
    check(prig, lambda: prig.a.update("Task", task["id"], {"entity": shot1}), reads)


def test_move_task_through_the_multi_side(prig: TwoProxies) -> None:
    shot1, shot3 = prig.one("Shot", "sh01"), prig.one("Shot", "sh03")
    task = prig.one("Task", "task2", "content")
    reads = tasks_of(shot1, shot3) + [("Task", [["id", "is", task["id"]]], ["entity"])]
    check(prig, lambda: prig.a.update("Shot", shot3["id"], {"tasks": [task]},
                                      multi_entity_update_modes={"tasks": "add"}), reads)


def seq_reads(prig: TwoProxies, shot: dict[str, Any]) -> list[Read]:
    return [("Sequence", [], ["code", "shots"]), ("Shot", [["id", "is", shot["id"]]], ["sg_sequence"]),
            ("Shot", [["sg_sequence.Sequence.code", "is", "SQ1"]], ["code"])]


def test_shot_changes_sequence(prig: TwoProxies) -> None:
    shot2 = prig.one("Shot", "sh02")
    seq = prig.one("Sequence", "SQ2")
    check(prig, lambda: prig.a.update("Shot", shot2["id"], {"sg_sequence": seq}), seq_reads(prig, shot2))


def test_sequence_shots_add_moves_the_shot(prig: TwoProxies) -> None:
    shot2 = prig.one("Shot", "sh02")
    seq = prig.one("Sequence", "SQ1")
    check(prig, lambda: prig.a.update("Sequence", seq["id"], {"shots": [shot2]},
                                      multi_entity_update_modes={"shots": "add"}), seq_reads(prig, shot2))


def test_sequence_shots_set_unlinks_the_others(prig: TwoProxies) -> None:
    shot4 = prig.one("Shot", "sh04")
    seq = prig.one("Sequence", "SQ2")
    check(prig, lambda: prig.a.update("Sequence", seq["id"], {"shots": [shot4]}), seq_reads(prig, shot4)
          + [("Shot", [["sg_sequence", "is", None]], ["code"])])


def test_shot_assets_add_and_remove(prig: TwoProxies) -> None:
    shot5 = prig.one("Shot", "sh05")
    a0, a2 = prig.one("Asset", "asset0"), prig.one("Asset", "asset2")
    reads: list[Read] = [("Asset", [], ["code", "shots"]), ("Shot", [["id", "is", shot5["id"]]], ["assets"])]
    check(prig, lambda: prig.a.update("Shot", shot5["id"], {"assets": [a2]},
                                      multi_entity_update_modes={"assets": "add"}), reads)
    check(prig, lambda: prig.a.update("Shot", shot5["id"], {"assets": [a0]},
                                      multi_entity_update_modes={"assets": "remove"}), reads)
    check(prig, lambda: prig.a.update("Asset", a0["id"], {"shots": [shot5]}), reads)


def test_asset_parents_and_children(prig: TwoProxies) -> None:
    a0, a1 = prig.one("Asset", "asset0"), prig.one("Asset", "asset1")
    reads: list[Read] = [("Asset", [], ["code", "parents", "assets"])]
    check(prig, lambda: prig.a.update("Asset", a1["id"], {"parents": [a0]}), reads)


@both_modes
def test_create_shot_with_task_template(prig: TwoProxies) -> None:
    proj = prig.one("Project", "Pairs", "name")
    tmpl = {"type": "TaskTemplate", "id": 7}
    reads: list[Read] = [("Task", [["entity.Shot.code", "is", "tmpl-shot"]], ["content", "entity"]),
                         ("Task", [], ["content"]), ("Shot", [["code", "is", "tmpl-shot"]], ["code", "tasks"])]
    made = check(prig, lambda: prig.a.create("Shot", {"code": "tmpl-shot", "project": proj, "task_template": tmpl}),
                 reads, modelled=False)
    assert len(prig.direct.find("Task", [["entity", "is", {"type": "Shot", "id": made["id"]}]])) == 2


def test_create_note_on_shot_version_and_task(prig: TwoProxies) -> None:
    shot5, version = prig.one("Shot", "sh05"), prig.one("Version", "v001")
    task = prig.one("Task", "task1", "content")
    proj = prig.one("Project", "Pairs", "name")
    reads: list[Read] = [("Shot", [["id", "is", shot5["id"]]], ["notes"]),
                         ("Version", [["id", "is", version["id"]]], ["notes"]),
                         ("Task", [["id", "is", task["id"]]], ["notes"])]
    check(prig, lambda: prig.a.create("Note", {"subject": "look", "project": proj, "note_links": [shot5, version],
                                               "tasks": [task]}), reads)


def test_retire_and_revive_a_linked_task(prig: TwoProxies) -> None:
    shot5 = prig.one("Shot", "sh05")
    task = prig.one("Task", "task1", "content")
    reads = tasks_of(shot5) + [("Task", [["entity", "is", shot5]], ["content"]),
                               ("Note", [], ["subject", "tasks"])]
    check(prig, lambda: prig.a.delete("Task", task["id"]), reads, modelled=None)
    check(prig, lambda: prig.a.revive("Task", task["id"]), reads, modelled=None)


def test_retire_and_revive_a_shot_others_link_to(prig: TwoProxies) -> None:
    shot5 = prig.one("Shot", "sh05")
    reads: list[Read] = [("Task", [], ["content", "entity"]), ("Sequence", [], ["shots"]),
                         ("Asset", [], ["shots"]), ("Version", [], ["entity"]), ("Note", [], ["note_links"])]
    check(prig, lambda: prig.a.delete("Shot", shot5["id"]), reads, modelled=False)
    check(prig, lambda: prig.a.revive("Shot", shot5["id"]), reads, modelled=False)


@both_modes
def test_batch_of_writes(prig: TwoProxies) -> None:
    shot1, shot6 = prig.one("Shot", "sh01"), prig.one("Shot", "sh06")
    seq = prig.one("Sequence", "SQ1")
    reads = tasks_of(shot1, shot6) + seq_reads(prig, shot6)
    check(prig, lambda: prig.a.batch([
        {"request_type": "create", "entity_type": "Task", "data": {"content": "b1", "entity": shot6}},
        {"request_type": "update", "entity_type": "Shot", "entity_id": shot6["id"], "data": {"sg_sequence": seq}},
    ]), reads)


def test_updated_at_is_not_served_stale_after_an_update(prig: TwoProxies) -> None:
    shot3 = prig.one("Shot", "sh03")
    reads: list[Read] = [("Shot", [["id", "is", shot3["id"]]], ["code", "updated_at", "updated_by"])]
    check(prig, lambda: prig.a.update("Shot", shot3["id"], {"description": "later"}), reads, modelled=False)


@both_modes
def test_lost_answer_marks_what_the_write_could_change(prig: TwoProxies) -> None:
    """SG applies an update but its answer is lost on the way: the proxy cannot know whether it was
    applied, so what it could change passes until the ingester has SG's events."""
    shot1, shot4 = prig.one("Shot", "sh01"), prig.one("Shot", "sh04")
    task = prig.one("Task", "task0", "content")
    reads = tasks_of(shot1, shot4) + [("Task", [["id", "is", task["id"]]], ["entity"])]
    prig.assert_hits_after_ingest(reads)
    prig.rig.server.drop_next_answers(1)
    with pytest.raises(shotgun_api3.Fault, match="may have been applied"):
        prig.a.update("Task", task["id"], {"entity": shot4})
    assert prig.direct.find_one("Task", [["id", "is", task["id"]]], ["entity"])["entity"]["id"] == shot4["id"]
    prig.assert_sg_answers(reads)
    prig.assert_hits_after_ingest(reads)


def test_unknown_pair_waits_for_the_ingester(prig: TwoProxies, tmp_path: Path) -> None:
    """A custom pair the project does not ship: the reverse side passes until the ingester has the
    write's events; the ingester learns the pair from the backref event, and the next write of it is
    applied on both sides by the proxy."""
    site = prig.rig.site
    site.add_pair(("Version", "playlists"), ("Playlist", "versions"))
    version = prig.one("Version", "v001")
    proj = prig.one("Project", "Pairs", "name")
    pl = prig.a.create("Playlist", {"code": "daily", "project": proj})
    reads: list[Read] = [("Version", [["id", "is", version["id"]]], ["playlists"]),
                         ("Playlist", [], ["code", "versions"])]
    check(prig, lambda: prig.a.update("Playlist", pl["id"], {"versions": [version]}), reads[:1], modelled=False)
    pl2 = prig.a.create("Playlist", {"code": "weekly", "project": proj})
    prig.ingest()
    # learned: now applied by the proxy, a hit at once through both proxies
    prig.a.update("Playlist", pl2["id"], {"versions": [version]})
    before = prig.rig.reads()
    prig.assert_sg_answers(reads[:1])
    assert prig.rig.reads() == before + 1, "the learned pair's other side was not applied"


def test_with_the_ingester_following(tmp_path: Path, db_url: str) -> None:
    """The ingester running (polling every 0.2 s) and two proxies: every read right after a write
    is SG's answer, whoever is faster, and the reads become hits once the ingester caught up."""
    site = FakeSite.basic()
    populate_pairs(site)
    with Rig(tmp_path, db_url, site, ingester=True, poll_interval=0.2) as fresh:
        proxy_b = fresh.start_proxy(RIG_OPTIONS, workdir=tmp_path / "proxy-b")
        writer = fresh.client()
        b = fresh.client(proxy_b, script_name=READER, api_key=READER_KEY)
        b.find_one("Project", [])
        direct = fresh.direct()

        def one(entity_type: str, code: str, field: str = "code") -> dict[str, Any]:
            return {"type": entity_type, "id": direct.find_one(entity_type, [[field, "is", code]])["id"]}

        shot5, shot1 = one("Shot", "sh05"), one("Shot", "sh01")
        proj = one("Project", "Pairs", "name")
        task = one("Task", "task0", "content")
        reads: list[Read] = [("Shot", [["id", "in", [shot5["id"], shot1["id"]]]], ["code", "tasks"]),
                             ("Task", [], ["content", "entity"]), ("Shot", [], ["code", "sg_sequence", "tasks"])]
        writes: list[Callable[[], Any]] = [
            lambda: writer.update("Task", task["id"], {"entity": shot1}),
            lambda: writer.create("Shot", {"code": "tmpl", "project": proj,
                                           "task_template": {"type": "TaskTemplate", "id": 7}}),
            lambda: writer.update("Sequence", one("Sequence", "SQ1")["id"], {"shots": [shot5]},
                                  multi_entity_update_modes={"shots": "add"}),
            lambda: writer.delete("Task", task["id"]),
        ]
        for write in writes:
            write()
            for entity_type, filters, fields in reads:
                expected = direct.find(entity_type, filters, fields)
                assert fresh.reader.find(entity_type, filters, fields) == expected  # proxy A
                assert b.find(entity_type, filters, fields) == expected  # proxy B
        for entity_type, filters, fields in reads:
            expected = direct.find(entity_type, filters, fields)
            fresh.wait_hit(lambda t=entity_type, f=filters, fl=fields: fresh.reader.find(t, f, fl),
                           lambda got, e=expected: got == e, timeout=30)
