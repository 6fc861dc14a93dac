"""A seeded random write-then-read differential, end to end: each step makes one random write through
mitmdump (a real shotgun_api3 client) and at once reads back, through the proxy, a random set of reads
touching what changed and what links to it; every answer must equal the same read sent straight to the
fake SG at the same moment (writes go only through the proxy, so SG does not move between the two).

The writes: creates (some with ``task_template``, some linking existing entities through single and
multi-entity fields), updates of link fields in ``set``/``add``/``remove`` modes, of paired fields from
either side, deletes and revives of entities others link to, and ``batch`` calls mixing these. The
reads: by id (also ``retired_only``), deep filters through the changed links, ``in``/``not_in`` on
multi-entity fields, sorts on linked names, EventLogEntry (cached in the ingester variant).

Two rigs: with ``scripts/ingest-events`` running (markers clear, reads turn back into hits; the test
lets it catch up now and then), and without (markers stay: those reads keep passing). A read counts as
a hit when the fake served no read to the reading client's script; a run that only saw passes proves
nothing, so a share of hits is asserted (a number of hits without the ingester).

``SGCACHE_FUZZ_SEED`` (default below) and ``SGCACHE_RW_STEPS`` (default 40) choose the run.
"""

from __future__ import annotations

import collections
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shotgun_api3

from .fakesg import FakeSite
from .rig import KEY, READER, READER_KEY, SCRIPT, Rig

SEED = int(os.environ.get("SGCACHE_FUZZ_SEED", "20261206"))
STEPS = int(os.environ.get("SGCACHE_RW_STEPS", "40"))
#: The least share of the proxied reads that must be hits with the ingester (markers clear); without
#: it every marker stays (a delete or a template marks whole types for the rest of the run), so the
#: share falls the longer the run (2-29% seen): there, a least number of hits.
MIN_HIT_SHARE, MIN_HITS_NO_INGESTER = 0.35, 10
TEMPLATE = {"type": "TaskTemplate", "id": 7}
MODES = ("set", "add", "remove")
#: The fields read back, per type.
FIELDS: dict[str, list[str]] = {
    "Shot": ["code", "sg_sequence", "assets", "tasks", "notes", "sg_status_list", "project", "task_template"],
    "Sequence": ["code", "shots", "tasks", "notes"],
    "Asset": ["code", "shots", "parents", "assets", "tasks", "notes"],
    "Task": ["content", "entity", "notes", "sg_status_list"],
    "Note": ["subject", "note_links", "tasks"],
    "Version": ["code", "entity", "notes"],
}
NAME = {"Shot": "code", "Sequence": "code", "Asset": "code", "Task": "content", "Note": "subject", "Version": "code"}
Read = tuple[str, list[Any], list[str], dict[str, Any]]


def populate_rw(site: FakeSite) -> None:
    """A project, three sequences, eight shots, four assets, tasks, versions, notes and a task template."""
    proj = site.create_direct("Project", {"name": "RW"})
    p = {"type": "Project", "id": proj["id"]}
    seqs = [site.create_direct("Sequence", {"code": f"SQ{i}", "project": p}) for i in range(3)]
    assets = [site.create_direct("Asset", {"code": f"asset{i}", "project": p}) for i in range(4)]
    shots = []
    for i in range(8):
        shots.append(site.create_direct("Shot", {
            "code": f"sh{i:02d}", "project": p,
            "sg_sequence": {"type": "Sequence", "id": seqs[i % 3]["id"]} if i != 7 else None,
            "assets": [{"type": "Asset", "id": a["id"]} for a in assets[: i % 3]]}))
    tasks = [site.create_direct("Task", {"content": f"task{i}", "project": p,
                                         "entity": {"type": "Shot", "id": shots[i % 4]["id"]}}) for i in range(6)]
    for i in range(2):
        site.create_direct("Version", {"code": f"v{i}", "project": p, "entity": {"type": "Shot", "id": shots[i]["id"]}})
    for i in range(3):
        site.create_direct("Note", {"subject": f"note{i}", "project": p,
                                    "note_links": [{"type": "Shot", "id": shots[i]["id"]}],
                                    "tasks": [{"type": "Task", "id": tasks[i]["id"]}]})
    site.add_task_template(7, "Basic shot", [{"content": "Layout"}, {"content": "Anim"}])


class Fuzz:
    """The random writes and reads of one run, and what it saw."""

    def __init__(self, rig: Rig, rnd: random.Random, events: bool):
        self.rig, self.rnd, self.events = rig, rnd, events
        self.writer = rig.client()
        self.reader = rig.reader or rig.client(script_name=READER, api_key=READER_KEY)
        self.direct = rig.direct()
        self.reader.find_one("Project", [])  # unseen credentials pass once
        self.proj = {"type": "Project", "id": self.direct.find_one("Project", [])["id"]}
        self.hits = self.passes = 0
        self.hits_after_write = self.reads_after_write = 0
        self.hit_types: collections.Counter[str] = collections.Counter()
        self.log: list[str] = []
        self.n = 0
        self.recent: list[dict[str, Any]] = []

    # -- the world as SG has it -----------------------------------------------------------
    def live(self, entity_type: str) -> list[dict[str, Any]]:
        return [{"type": entity_type, "id": r["id"]} for r in self.rig.site.find_direct(entity_type, [], ["id"])]

    def retired(self, entity_type: str) -> list[dict[str, Any]]:
        rows = self.direct.find(entity_type, [], ["id"], retired_only=True)
        return [{"type": entity_type, "id": r["id"]} for r in rows]

    def pick(self, entity_type: str, k: int = 1) -> list[dict[str, Any]]:
        rows = self.live(entity_type)
        picked = self.rnd.sample(rows, min(k, len(rows)))
        for link in picked:
            if self.rnd.random() < 0.15:
                link["name"] = "stale name"  # a link a tool read earlier: SG goes by type and id
        return picked

    def one(self, entity_type: str) -> dict[str, Any] | None:
        rows = self.pick(entity_type)
        return rows[0] if rows else None

    # -- writes: batch-request form --------------------------------------------------------
    def link_update(self) -> dict[str, Any] | None:
        """An update of a (mostly paired) link field, from either side, in a random mode."""
        rnd = self.rnd
        choice = rnd.randrange(9)
        if choice == 0:
            src, field, target, multi = "Task", "entity", rnd.choice(["Shot", "Asset", "Sequence"]), False
        elif choice == 1:
            src, field, target, multi = "Shot", "sg_sequence", "Sequence", False
        elif choice == 2:
            src, field, target, multi = "Sequence", "shots", "Shot", True
        elif choice == 3:
            src, field, target, multi = rnd.choice(["Shot", "Asset", "Sequence"]), "tasks", "Task", True
        elif choice == 4:
            src, field, target, multi = "Shot", "assets", "Asset", True
        elif choice == 5:
            src, field, target, multi = "Asset", "shots", "Shot", True
        elif choice == 6:
            src, field, target, multi = "Asset", rnd.choice(["parents", "assets"]), "Asset", True
        elif choice == 7:
            src, field, target, multi = "Note", rnd.choice(["note_links", "tasks"]), "Shot", True
            if field == "tasks":
                target = "Task"
            else:
                target = rnd.choice(["Shot", "Asset", "Version", "Sequence"])
        else:
            src, field, target, multi = rnd.choice(["Shot", "Task", "Asset", "Version", "Sequence"]), "notes", "Note", True
        row = self.one(src)
        if row is None:
            return None
        req: dict[str, Any] = {"request_type": "update", "entity_type": src, "entity_id": row["id"]}
        if multi:
            value = self.pick(target, rnd.randrange(0, 3))
            req["data"] = {field: value}
            mode = rnd.choice(MODES)
            if mode != "set" or rnd.random() < 0.3:
                req["multi_entity_update_modes"] = {field: mode}
        else:
            req["data"] = {field: None if rnd.random() < 0.15 else self.one(target)}
        if rnd.random() < 0.2:
            req["data"][NAME[src]] = f"{NAME[src][:2]}{self.n}"
        return req

    def create(self) -> dict[str, Any] | None:
        rnd = self.rnd
        entity_type = rnd.choice(["Shot", "Shot", "Task", "Note", "Asset", "Sequence"])
        data: dict[str, Any] = {NAME[entity_type]: f"new{self.n}", "project": self.proj}
        if entity_type == "Shot":
            if rnd.random() < 0.5:
                data["sg_sequence"] = self.one("Sequence")
            data["assets"] = self.pick("Asset", rnd.randrange(3))
            if rnd.random() < 0.3:
                data["tasks"] = self.pick("Task", 1)
            if rnd.random() < 0.35:
                data["task_template"] = TEMPLATE
        elif entity_type == "Task":
            data["entity"] = self.one(rnd.choice(["Shot", "Asset", "Sequence"]))
        elif entity_type == "Note":
            data["note_links"] = self.pick("Shot", 1) + self.pick(rnd.choice(["Asset", "Version", "Sequence"]), 1)
            data["tasks"] = self.pick("Task", rnd.randrange(3))
        elif entity_type == "Asset":
            data["shots"] = self.pick("Shot", rnd.randrange(3))
            data["parents"] = self.pick("Asset", rnd.randrange(2))
            if rnd.random() < 0.3:
                data["task_template"] = TEMPLATE
        else:
            data["shots"] = self.pick("Shot", rnd.randrange(3))
        req = {"request_type": "create", "entity_type": entity_type, "data": data}
        if rnd.random() < 0.4:  # SG answers with these too: the proxy may store them
            extra = {"Shot": "sg_sequence.Sequence.code", "Task": "entity.Shot.code"}.get(entity_type, "project.Project.name")
            req["return_fields"] = rnd.sample(FIELDS[entity_type] + ["updated_at", "created_by", extra], 3)
        return req

    def delete(self) -> dict[str, Any] | None:
        entity_type = self.rnd.choice(["Shot", "Asset", "Task", "Sequence", "Note"])
        live = self.live(entity_type)
        if len(live) < 3:
            return None
        row = self.rnd.choice(live)
        return {"request_type": "delete", "entity_type": entity_type, "entity_id": row["id"]}

    def rename(self) -> dict[str, Any] | None:
        """A new name for an entity others link: a Project, the TaskTemplate (not cached), a Sequence, an Asset."""
        entity_type = self.rnd.choice(["Project", "TaskTemplate", "Sequence", "Asset", "Shot"])
        if entity_type == "TaskTemplate":
            return {"request_type": "update", "entity_type": entity_type, "entity_id": TEMPLATE["id"],
                    "data": {"code": f"tmpl{self.n}"}}
        row = self.one(entity_type)
        if row is None:
            return None
        field = "name" if entity_type == "Project" else "code"
        return {"request_type": "update", "entity_type": entity_type, "entity_id": row["id"],
                "data": {field: f"{entity_type[:2].lower()}{self.n}"}}

    def one_write(self) -> dict[str, Any] | None:
        r = self.rnd.random()
        if r < 0.08:
            return self.rename()
        if r < 0.55:
            return self.link_update()
        if r < 0.8:
            return self.create()
        return self.delete()

    def write(self) -> tuple[str, list[dict[str, Any]]]:
        """Make one random write through the proxy; (what it was, the entities it names)."""
        rnd = self.rnd
        r = rnd.random()
        if r < 0.12:
            for entity_type in rnd.sample(["Shot", "Asset", "Task", "Sequence", "Note"], 5):
                dead = self.retired(entity_type)
                if dead:
                    row = rnd.choice(dead)
                    self.writer.revive(entity_type, row["id"])
                    return f"revive {entity_type} {row['id']}", [row]
        if r < 0.17:
            # a batch SG refuses as a whole (its last request names no entity): nothing of it happened
            reqs = [q for q in (self.one_write() for _ in range(2)) if q is not None and q["request_type"] != "delete"]
            reqs.append({"request_type": "update", "entity_type": "Shot", "entity_id": 99999, "data": {"code": "x"}})
            with pytest.raises(shotgun_api3.Fault):
                self.writer.batch(reqs)
            return f"refused batch {reqs}", self.named(reqs[:-1], [{"id": 0}] * (len(reqs) - 1))
        if r < 0.3:
            reqs = [q for q in (self.one_write() for _ in range(rnd.randrange(2, 4))) if q is not None]
            # a delete only last: a later request of the batch may name the entity it retires
            deletes = [q for q in reqs if q["request_type"] == "delete"]
            reqs = [q for q in reqs if q["request_type"] != "delete"] + deletes[:1]
            if reqs:
                results = self.writer.batch(reqs)
                return f"batch {reqs}", self.named(reqs, results)
        req = None
        while req is None:
            req = self.one_write()
        kind = req["request_type"]
        if kind == "create":
            result = self.writer.create(req["entity_type"], req["data"], return_fields=req.get("return_fields"))
        elif kind == "update":
            result = self.writer.update(req["entity_type"], req["entity_id"], req["data"],
                                        multi_entity_update_modes=req.get("multi_entity_update_modes"))
        else:
            result = self.writer.delete(req["entity_type"], req["entity_id"])
        return f"{kind} {req}", self.named([req], [result])

    @staticmethod
    def named(reqs: list[dict[str, Any]], results: list[Any]) -> list[dict[str, Any]]:
        """The entities a list of requests wrote and linked."""
        out: list[dict[str, Any]] = []
        for req, result in zip(reqs, results, strict=True):
            if req["request_type"] == "create":
                if not result["id"]:
                    continue
                out.append({"type": req["entity_type"], "id": result["id"]})
            else:
                out.append({"type": req["entity_type"], "id": req["entity_id"]})
            for value in (req.get("data") or {}).values():
                links = value if isinstance(value, list) else [value]
                out += [{"type": v["type"], "id": v["id"]} for v in links if isinstance(v, dict) and "id" in v]
        return out

    # -- reads -------------------------------------------------------------------------------
    def reads(self, touched: list[dict[str, Any]]) -> list[Read]:
        """Reads of what a write touched and of what links to it."""
        rnd = self.rnd
        out: list[Read] = []
        for ent in touched:
            t = ent["type"]
            if t not in FIELDS:
                continue
            fields = FIELDS[t] + (["updated_at"] if rnd.random() < 0.2 else [])
            out.append((t, [["id", "is", ent["id"]]], fields, {}))
            out.append((t, [["id", "is", ent["id"]]], fields, {"retired_only": True}))
            if t == "Sequence":
                out.append(("Shot", [["sg_sequence", "is", ent]], ["code", "sg_sequence"], {}))
                out.append(("Task", [["entity", "is", ent]], ["content"], {}))
            elif t == "Shot":
                out.append(("Sequence", [["shots", "in", [ent]]], ["code", "shots"], {}))
                out.append(("Asset", [["shots", "not_in", [ent]]], ["code"], {}))
                out.append(("Task", [["entity.Shot.code", "contains", "sh"]], ["content", "entity"], {}))
                out.append(("Note", [["note_links", "in", [ent]]], ["subject", "note_links"], {}))
            elif t == "Asset":
                out.append(("Shot", [["assets", "in", [ent]]], ["code", "assets"], {}))
                out.append(("Asset", [["parents", "in", [ent]]], ["code", "parents"], {}))
                out.append(("Asset", [["assets", "not_in", [ent]]], ["code", "assets"], {}))
            elif t == "Task":
                out.append(("Shot", [["tasks", "in", [ent]]], ["code", "tasks"], {}))
                out.append(("Note", [["tasks", "not_in", [ent]]], ["subject"], {}))
            elif t == "Note":
                out.append(("Task", [["notes", "in", [ent]]], ["content", "notes"], {}))
        seq = self.rnd.choice(["SQ0", "SQ1", "SQ2"])
        out += [
            ("Shot", [["sg_sequence.Sequence.code", "is", seq]], ["code", "sg_sequence"], {}),
            ("Shot", [], ["code", "sg_sequence"], {"order": [{"field_name": "sg_sequence", "direction": "asc"},
                                                              {"field_name": "code", "direction": "desc"}]}),
            ("Task", [], ["content", "entity"], {"order": [{"field_name": "entity", "direction": "desc"}]}),
            ("Shot", [], ["code"], {"order": [{"field_name": "sg_sequence.Sequence.code", "direction": "asc"}]}),
            ("Task", [["entity.Shot.sg_sequence.Sequence.code", "is", seq]], ["content"], {}),
            ("Shot", [["tasks", "is", None]], ["code"], {}),
            ("Asset", [["shots.Shot.code", "starts_with", "sh0"]], ["code"], {}),
            ("Note", [["note_links.Shot.sg_sequence", "is", None]], ["subject"], {}),
            ("Shot", [], ["code", "tasks", "assets"], {"retired_only": True}),
            ("Task", [], ["content", "entity"], {"retired_only": True}),
            ("Sequence", [], ["code", "shots"], {}),
            ("Task", [["entity", "name_contains", rnd.choice(["sh0", "co", "asset", "SQ"])]], ["content"], {}),
            ("Task", [["entity", "type_is", rnd.choice(["Shot", "Asset", "Sequence"])]], ["content", "entity"], {}),
            ("Shot", [["sg_sequence", "name_is", seq]], ["code"], {}),
            ("Note", [["note_links", "name_contains", "sh"]], ["subject"], {}),
            ("Note", [], ["subject", "note_links"], {"order": [{"field_name": "subject", "direction": "asc"}],
                                                     "limit": 3}),
            ("Shot", [["assets", "is_not", None]], ["code", "assets"], {"limit": 4,
                                                                       "order": [{"field_name": "sg_sequence",
                                                                                  "direction": "desc"}]}),
            ("Version", [], ["code", "notes", "entity"], {}),
            ("Shot", [["task_template", "is_not", None]], ["code", "task_template", "project"], {}),
            ("Task", [["project.Project.name", "contains", "r"]], ["content", "project"],
             {"order": [{"field_name": "entity", "direction": "asc"}]}),
            ("Asset", [], ["code", "parents", "assets"], {}),
        ]
        if self.events:
            last = self.rig.site.last_event_id()
            out.append(("EventLogEntry", [["id", "greater_than", last - 15]],
                        ["event_type", "entity", "attribute_name", "meta"], {"order": [{"field_name": "id",
                                                                                         "direction": "asc"}]}))
            # the poller pattern: a full page whose last id the ingester has is answered
            out.append(("EventLogEntry", [["id", "greater_than", max(0, last - 60)]],
                        ["event_type", "entity", "meta", "user"],
                        {"order": [{"field_name": "id", "direction": "asc"}], "limit": 10}))
            out.append(("EventLogEntry", [["id", "between", [max(1, last - 40), last - 10]]],
                        ["event_type", "entity", "attribute_name"], {}))
        k = min(len(out), rnd.randrange(6, 12))
        return rnd.sample(out, k)

    def check(self, read: Read, what: str) -> None:
        entity_type, filters, fields, extra = read
        expected = self.direct.find(entity_type, filters, fields, **extra)
        before = self.rig.site.count_by_script("read", READER)
        got = self.reader.find(entity_type, filters, fields, **extra)
        hit = self.rig.site.count_by_script("read", READER) == before
        self.hits += hit
        self.hit_types[entity_type] += hit
        if what != "settling":
            self.hits_after_write += hit
            self.reads_after_write += 1
        self.passes += not hit
        assert got == expected, (
            f"seed {SEED} step {self.n} after {what}\nread {read} ({'hit' if hit else 'pass'})\n"
            f"proxy: {got}\nSG:    {expected}\nhistory:\n" + "\n".join(self.log[-12:]))

    def step(self) -> None:
        self.n += 1
        what, touched = self.write()
        self.log.append(what)
        self.recent += touched
        for read in self.reads(touched):
            self.check(read, what)


def run(rig: Rig, events: bool, settle_every: int) -> Fuzz:
    fuzz = Fuzz(rig, random.Random(SEED), events)
    for i in range(STEPS):
        fuzz.step()
        if settle_every and i % settle_every == settle_every - 1:
            rig.wait(rig.caught_up, timeout=30, what="the ingester to catch up")
            time.sleep(1.2)  # markers clear at a poll starting past them plus pending.MARGIN
            for read in fuzz.reads(fuzz.recent[-8:]):
                fuzz.check(read, "settling")
    total = fuzz.hits + fuzz.passes
    print(f"\nseed {SEED}, {STEPS} steps: {total} proxied reads, {fuzz.hits} hits ({fuzz.hits / total:.0%}); "
          f"right after a write {fuzz.hits_after_write} of {fuzz.reads_after_write}; by type {dict(fuzz.hit_types)}")
    return fuzz


@pytest.fixture
def site() -> FakeSite:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    site.add_script(READER, READER_KEY)
    populate_rw(site)
    return site


@pytest.fixture
def ingest_rig(tmp_path: Path, db_url: str, site: FakeSite) -> Iterator[Rig]:
    with Rig(tmp_path, db_url, site, ingester=True, poll_interval=0.2, extra_rules="+EventLogEntry.*\n") as rig:
        yield rig


@pytest.fixture
def plain_rig(tmp_path: Path, db_url: str, site: FakeSite) -> Iterator[Rig]:
    with Rig(tmp_path, db_url, site) as rig:
        yield rig


def test_writes_then_reads_with_the_ingester(ingest_rig: Rig) -> None:
    fuzz = run(ingest_rig, events=True, settle_every=5)
    assert fuzz.hits >= MIN_HIT_SHARE * (fuzz.hits + fuzz.passes), (fuzz.hits, fuzz.passes)


def test_writes_then_reads_without_the_ingester(plain_rig: Rig) -> None:
    fuzz = run(plain_rig, events=False, settle_every=0)
    assert fuzz.hits >= MIN_HITS_NO_INGESTER, (fuzz.hits, fuzz.passes)

