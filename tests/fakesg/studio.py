"""A realistic studio for the fake site: a few projects, each with sequences, assets, Shots, their
Tasks and Versions (for ``scripts/demo`` and benchmarks; deterministic for a given seed)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .site import FakeSite

STATUSES = ["wtg", "rdy", "ip", "rev", "fin", "hld"]
TASK_NAMES = ["layout", "anim", "fx", "light", "comp"]
SHOTS_PER_SEQUENCE = 40


@dataclass
class Studio:
    """What :func:`populate_studio` made: links to the rows a workload picks from."""

    projects: list[dict[str, Any]] = field(default_factory=list)
    sequences: list[dict[str, Any]] = field(default_factory=list)
    shots: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    versions: int = 0

    def counts(self) -> dict[str, int]:
        return {"Project": len(self.projects), "Sequence": len(self.sequences), "Shot": len(self.shots),
                "Task": len(self.tasks), "Version": self.versions}


def _link(row: dict[str, Any]) -> dict[str, Any]:
    return {"type": row["type"], "id": row["id"]}


def populate_studio(site: FakeSite, *, projects: int = 3, shots: int = 3000, tasks_per_shot: int = 3,
                    versions_per_shot: int = 2, assets_per_project: int = 20, seed: int = 13,
                    events: bool = False) -> Studio:
    """Fill ``site`` with ``shots`` Shots spread over ``projects`` projects, each Shot with its Tasks and
    Versions: the site's history, without events unless ``events`` (the fake reads its event log whole, so
    a long one slows every poll of an ingester)."""
    rng = random.Random(seed)
    studio = Studio()

    def make(entity_type: str, fields: dict[str, Any]) -> dict[str, Any]:
        return site.create_direct(entity_type, fields, events=events)

    names = ["Northern Lights", "Harbour", "Glasswing", "Tidewater", "Red Canyon", "Lantern"]
    for p in range(projects):
        name = names[p] if p < len(names) else f"Project {p + 1}"
        project = make("Project", {"name": name})
        studio.projects.append(project)
        proj = _link(project)
        for a in range(assets_per_project):
            make("Asset", {"code": f"{name.split()[0].lower()}_asset{a:03d}", "project": proj,
                                         "sg_status_list": rng.choice(STATUSES)})
        share = shots // projects + (1 if p < shots % projects else 0)
        sequences: list[dict[str, Any]] = []
        for s in range(share):
            if s % SHOTS_PER_SEQUENCE == 0:
                seq = make("Sequence", {"code": f"SQ{len(sequences) + 1:03d}", "project": proj})
                sequences.append(seq)
                studio.sequences.append(seq)
            cut_in = 1001
            shot = make("Shot", {
                "code": f"SQ{len(sequences):03d}_{(s % SHOTS_PER_SEQUENCE + 1) * 10:04d}", "project": proj,
                "sg_sequence": _link(sequences[-1]), "sg_status_list": rng.choice(STATUSES),
                "sg_cut_in": cut_in, "sg_cut_out": cut_in + rng.randint(24, 240),
                "description": f"shot {s + 1} of {name}"})
            studio.shots.append(shot)
            for t in range(tasks_per_shot):
                task = make("Task", {
                    "content": TASK_NAMES[t % len(TASK_NAMES)], "project": proj, "entity": _link(shot),
                    "sg_status_list": rng.choice(STATUSES)})
                studio.tasks.append(task)
            for v in range(versions_per_shot):
                make("Version", {
                    "code": f"{shot['code']}_comp_v{v + 1:03d}", "project": proj, "entity": _link(shot),
                    "sg_status_list": rng.choice(["rev", "fin", "ip"]),
                    "description": "first pass" if v == 0 else "notes addressed"})
                studio.versions += 1
    return studio
