"""Scale benchmark: a pipeline workload's p50 on a replica of 10,000 and of 1,000,000 entities.

    python -m benchmarks.bench_scale [--entities 10000 1000000] [--db sqlite|postgresql|URL]
                                     [--calls 30] [--keep DIR] [--reuse] [--explain]

Each size is built by the scanner itself (``Scanner.full_scan``, the write path ``scan --full``
uses) from an in-memory SG client serving pre-generated rows by keyset pages: 10% Shots (100 per
Sequence), 50% Tasks (5 per Shot, one per Step, with assignees: a multi_entity field) and 40%
Versions (4 per Shot, linked to a Task and a user), on the shipped schema (schema/basic.yml). The
scan's time and rows/s are printed. Then each query of the workload runs through the read engine
in-process (``Reader.read``: the code the proxy runs for a hit), the sizes taking turns call by
call (so a shared machine's load weighs on them alike), and its p50 / CPU-time p50 is printed per
size, with the ratio to the smallest size. ``--explain`` prints each query's plan.
The in-memory client stands in for tests/fakesg, whose query engine scans every row for each
keyset page (quadratic: too slow to serve a million rows). ``--reuse`` keeps each size's replica
(SQLite: the file in ``--keep DIR``; PostgreSQL: the schema ``bench_scale_<size>``) and, when it
is already there, opens it instead of building it (opening adds any index it lacks). Asserts nothing.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.support import DEFAULT_PG, drop_pg, kept_pg, pg_url  # noqa: E402
from cache.read import Reader, ReplicaState  # noqa: E402
from cache.replica.schema import Schema  # noqa: E402
from cache.replica.store import Store  # noqa: E402
from cache.scan.scanner import Scanner  # noqa: E402
from tests.paths import BASIC_SCHEMA  # noqa: E402

STEPS = ["layout", "anim", "light", "comp", "fx"]
STATUSES = ["wtg", "ip", "rev", "fin", "hld"]
USERS = 50
PROJECT = {"type": "Project", "id": 1, "name": "Bench"}


def _dt(n: int) -> str:
    """A date_time spread over ~a year, distinct per n."""
    day, sec = divmod(n * 37, 86400)
    return f"2024-{1 + day // 28 % 12:02d}-{1 + day % 28:02d}T{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}Z"


def generate(entities: int) -> dict[str, list[dict[str, Any]]]:
    """Rows per type, in id order: entities/10 Shots, /2 Tasks, *0.4 Versions, plus their links."""
    shots = max(10, entities // 10)
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in ("Project", "Step", "HumanUser", "Sequence",
                                                              "Shot", "Task", "Version")}
    rows["Project"].append({"id": 1, "name": "Bench", "archived": False})
    steps = [{"type": "Step", "id": i + 1, "name": s} for i, s in enumerate(STEPS)]
    rows["Step"] = [{"id": s["id"], "code": s["name"], "short_name": s["name"][:3]} for s in steps]
    users = [{"type": "HumanUser", "id": u, "name": f"Artist {u}"} for u in range(1, USERS + 1)]
    rows["HumanUser"] = [{"id": u["id"], "name": u["name"], "login": f"artist{u['id']}",
                         "firstname": "Artist", "lastname": str(u["id"])} for u in users]
    for q in range(1, shots // 100 + 2):
        rows["Sequence"].append({"id": q, "code": f"SQ{q:04d}", "project": PROJECT, "created_at": _dt(q)})
    task_id = version_id = 0
    for s in range(1, shots + 1):
        q = (s - 1) // 100 + 1
        code = f"SQ{q:04d}_SH{s:06d}"
        shot = {"type": "Shot", "id": s, "name": code}
        rows["Shot"].append({
            "id": s, "code": code, "description": f"Shot {s} of sequence {q}", "project": PROJECT,
            "sg_sequence": {"type": "Sequence", "id": q, "name": f"SQ{q:04d}"},
            "sg_status_list": STATUSES[s % 5], "sg_cut_in": 1001, "sg_cut_out": 1001 + s % 200,
            "created_at": _dt(s), "updated_at": _dt(s + 7)})
        for k, step in enumerate(steps):
            task_id += 1
            rows["Task"].append({
                "id": task_id, "content": f"{step['name']}_{s}", "entity": shot, "step": step,
                "project": PROJECT, "sg_status_list": STATUSES[(s + k) % 5],
                "due_date": f"2025-{1 + task_id % 12:02d}-{1 + task_id % 28:02d}",
                "created_at": _dt(task_id), "updated_at": _dt(task_id + 3),
                "task_assignees": [users[task_id % USERS], users[(task_id * 7) % USERS]][: 1 + task_id % 2]})
        for v in range(4):
            version_id += 1
            step = steps[(s + v) % 5]
            rows["Version"].append({
                "id": version_id, "code": f"{code}_{step['name']}_v{v + 1:03d}", "entity": shot,
                "sg_task": {"type": "Task", "id": task_id - 4 + (s + v) % 5, "name": f"{step['name']}_{s}"},
                "project": PROJECT, "user": users[version_id % USERS], "sg_status_list": STATUSES[v % 5],
                "description": f"take {v + 1} of {code}", "created_at": _dt(version_id * 3),
                "updated_at": _dt(version_id * 3 + 1), "frame_count": 100 + v})
    return rows


class MemorySG:
    """``Shotgun.find`` as the scanner calls it (``id greater_than`` keyset pages, by id)."""

    def __init__(self, rows: dict[str, list[dict[str, Any]]]):
        self.rows = rows
        self.ids = {t: [r["id"] for r in rs] for t, rs in rows.items()}

    def find(self, entity_type: str, filters: list[Any], fields: list[str] | None = None, order: Any = None,
             limit: int = 0, retired_only: bool = False, **_: Any) -> list[dict[str, Any]]:
        if retired_only or entity_type not in self.rows:
            return []
        after = next((f[2] for f in filters if f[:2] == ["id", "greater_than"]), 0)
        start = bisect.bisect_right(self.ids[entity_type], after)
        page = self.rows[entity_type][start:start + limit] if limit else self.rows[entity_type][start:]
        names = fields or []
        return [{"type": entity_type, "id": r["id"], **{f: r.get(f) for f in names if f != "id"}} for r in page]


def build(url: str, entities: int, reuse: bool = False) -> tuple[Store, dict[str, Any] | None]:
    """A replica of ``entities`` rows, primed by full scans; returns it and the scan's figures.

    With ``reuse``, a replica whose Versions (scanned last) are primed already is opened as it is (figures None).
    """
    schema = Schema.load(BASIC_SCHEMA)
    if reuse:
        store = Store.open(url, schema, writer=True)
        with store.engine.connect() as conn:
            if "Version" in store.primed_fields(conn):
                return store, None
        store.dispose()
    rows = generate(entities)
    sg = MemorySG(rows)
    store = Store.open(url, schema, writer=True)
    scanner = Scanner(store, sg, page_size=500)
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for entity_type in rows:
        n += scanner.full_scan(entity_type).rows
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return store, {"rows": n, "wall": wall, "cpu": cpu}


def workload(rows_per_type: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The pipeline reads, as API3 ``read`` params; the same result sizes at every replica size."""
    shots = rows_per_type["Shot"]
    seq = {"type": "Sequence", "id": max(1, shots // 200)}  # a sequence in the middle
    shot = {"type": "Shot", "id": shots // 2 + 17}
    code = f"SQ{(shot['id'] - 1) // 100 + 1:04d}_SH{shot['id']:06d}"

    def read(entity_type: str, fields: list[str], conds: list[tuple[str, str, list[Any]]],
             sorts: list[tuple[str, str]] = (), per_page: int = 50, page: int = 1) -> dict[str, Any]:
        return {"type": entity_type, "return_fields": fields, "return_only": "active",
                "filters": {"logical_operator": "and", "conditions": [
                    {"path": p, "relation": r, "values": v} for p, r, v in conds]},
                "sorts": [{"field_name": f, "direction": d} for f, d in sorts],
                "paging": {"entities_per_page": per_page, "current_page": page},
                "return_paging_info_without_counts": False}

    shot_f = ["code", "sg_status_list", "sg_sequence", "sg_cut_in", "sg_cut_out", "description"]
    task_f = ["content", "step", "entity", "sg_status_list", "due_date", "task_assignees"]
    ver_f = ["code", "entity", "sg_task", "user", "sg_status_list", "created_at"]
    return {
        "Shots of a Sequence": read("Shot", shot_f, [("sg_sequence", "is", [seq])], [("code", "asc")], 500),
        "Tasks of a Shot by step": read("Task", task_f, [("entity", "is", [shot]),
                                                         ("step.Step.code", "is", ["comp"])]),
        "latest Versions of a Shot": read("Version", ver_f, [("entity", "is", [shot])],
                                          [("created_at", "desc")], 2),
        "Shot code is (any case)": read("Shot", shot_f, [("code", "is", [code.lower()])]),
        "Shot code starts_with": read("Shot", shot_f, [("code", "starts_with", [code[:-1].lower()])]),
        "Version code contains, paged": read("Version", ver_f, [("code", "contains", ["_comp_v002"])]),
        "Shots sorted by code, page 1": read("Shot", shot_f, [], [("code", "asc")]),
        "Shots sorted by code, page 20": read("Shot", shot_f, [], [("code", "asc")], 50, 20),
        "Versions by code desc": read("Version", ver_f, [], [("code", "desc")]),
        "Tasks by due_date desc": read("Task", task_f, [], [("due_date", "desc")]),
        "Versions newest first, page 20": read("Version", ver_f, [], [("created_at", "desc")], 50, 20),
        "deep: Tasks of a Sequence's Shots": read("Task", task_f, [("entity.Shot.sg_sequence", "is", [seq]),
                                                                    ("sg_status_list", "is", ["ip"])]),
        "deep: Versions of comp Tasks of a Shot": read("Version", ver_f, [
            ("sg_task.Task.step.Step.code", "is", ["comp"]), ("entity", "is", [shot])]),
        "assignee (multi_entity) is, paged": read("Task", task_f, [
            ("task_assignees", "is", [{"type": "HumanUser", "id": 7}])], [("due_date", "asc")]),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall ms, CPU ms, result) of one call."""
    w, c = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - w) * 1000, (time.process_time() - c) * 1000, result


def explain(store: Store, conn: sa.Connection, reader: Reader, params: dict[str, Any], state: ReplicaState) -> str:
    plan = reader.plan(params, state)
    sql = str(plan.select.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    prefix = "EXPLAIN QUERY PLAN " if store.dialect.name == "sqlite" else "EXPLAIN "
    lines = conn.exec_driver_sql(prefix + sql.replace("%", "%%")).all()
    return "\n".join("    " + str(r[-1]) for r in lines)


def measure(stores: dict[int, Store], calls: int, show_plans: bool,
            only: list[str] | None = None) -> dict[int, dict[str, tuple[float, float, int]]]:
    """Each query's (wall p50 ms, CPU p50 ms, rows) per size: the sizes take turns call by call
    (after 3 warm-ups each), so a shared machine's load weighs on them alike."""
    with contextlib.ExitStack() as stack:
        runs: dict[int, dict[str, Callable[[], Any]]] = {}
        conns: list[sa.Connection] = []
        for n, store in stores.items():
            reader, conn = Reader(store), stack.enter_context(store.engine.connect())
            conns.append(conn)
            state = ReplicaState(store.primed_fields(conn))
            sizes = {t: conn.execute(sa.select(sa.func.count()).select_from(tbl)).scalar_one()
                     for t, tbl in store.tables.items() if t in ("Shot", "Task", "Version")}
            conn.rollback()
            runs[n] = {}
            for name, params in workload(sizes).items():
                if only and not any(o.lower() in name.lower() for o in only):
                    continue
                if show_plans:
                    print(f"  {n:,} {name}:\n{explain(store, conn, reader, params, state)}")
                    conn.rollback()
                runs[n][name] = lambda p=params, c=conn, r=reader, s=state: r.read(c, p, s)
        out: dict[int, dict[str, tuple[float, float, int]]] = {n: {} for n in stores}
        for name in next(iter(runs.values())):
            for n in stores:
                for _ in range(3):
                    runs[n][name]()
            samples: dict[int, list[tuple[float, float, Any]]] = {n: [] for n in stores}
            for _ in range(calls):
                for n in stores:
                    samples[n].append(timed(runs[n][name]))
            for n, got in samples.items():
                out[n][name] = (statistics.median(g[0] for g in got), statistics.median(g[1] for g in got),
                                len(got[-1][2]["entities"]))
            for conn in conns:
                conn.rollback()
    return out


def backends(spec: str, tmp: Path, reuse: bool = False) -> Iterator[tuple[str, Callable[[int], str],
                                                                            Callable[[], None]]]:
    """(name, URL for a size, cleanup) of the requested database."""
    if spec == "sqlite" or spec.startswith("sqlite"):
        keep = spec if spec.startswith("sqlite:") else None
        yield "SQLite", (lambda n: keep or f"sqlite:///{tmp}/scale-{n}.db"), (lambda: None)
        return
    base = DEFAULT_PG if spec == "postgresql" else spec
    made: list[str] = []

    def url(n: int) -> str:
        if reuse:
            return kept_pg(base, f"bench_scale_{n}")
        got = pg_url(base)
        if got is None:
            raise SystemExit("PostgreSQL unavailable")
        made.append(got[1])
        return got[0]

    yield "PostgreSQL", url, lambda: [drop_pg(base, s) for s in made]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--db", default="sqlite", help=f"sqlite (a temporary file), postgresql ({DEFAULT_PG}), or a URL")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--explain", action="store_true", help="print each query's plan at each size")
    parser.add_argument("--keep", type=Path, help="SQLite: keep the replica files in this directory")
    parser.add_argument("--only", nargs="+", help="only the queries whose names contain one of these")
    parser.add_argument("--reuse", action="store_true",
                        help="keep each size's replica and open it if there (SQLite: needs --keep; "
                             "PostgreSQL: schema bench_scale_<size>, never dropped)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="sgcache-scale-") as tmp:
        for name, url_for, cleanup in backends(args.db, args.keep or Path(tmp), args.reuse):
            stores: dict[int, Store] = {}
            try:
                for n in args.entities:
                    store, scan = build(url_for(n), n, args.reuse)
                    stores[n] = store
                    if scan is None:
                        print(f"{name} {n:,} entities: the kept replica")
                    else:
                        print(f"{name} {n:,} entities: scan --full of {scan['rows']:,} rows in {scan['wall']:.1f} s "
                              f"= {scan['rows'] / scan['wall']:,.0f} rows/s (CPU of this process {scan['cpu']:.1f} s)")
                results = measure(stores, args.calls, args.explain, args.only)
            finally:
                for store in stores.values():
                    store.dispose()
                cleanup()
            base = args.entities[0]
            head = " | ".join(f"p50 {n:,} (wall / CPU ms)" for n in args.entities)
            print(f"\n{name}\n| query | rows | {head} | ratio (wall / CPU) |\n|---|---|"
                  + "---|" * len(args.entities) + "---|")
            for q in results[base]:
                cells = " | ".join(f"{results[n][q][0]:.2f} / {results[n][q][1]:.2f}" for n in args.entities)
                last = results[args.entities[-1]][q]
                first = results[base][q]
                print(f"| {q} | {last[2]} | {cells} | {last[0] / first[0]:.2f} / {last[1] / max(first[1], 1e-3):.2f} |")


if __name__ == "__main__":
    main()
