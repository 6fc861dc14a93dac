"""Read benchmark: a cached find() through mitmdump vs the same SQL run directly.

    python -m benchmarks.bench_read [--shots 100000] [--db URL] [--calls 300]

Fills a replica with N Shots (plus as many Tasks and Versions), then times, with the
real shotgun_api3 client, a 50-row find() of 8 fields with one deep field answered
through mitmdump; the same read run straight through SQLAlchemy; and mitmdump
answering a constant body (its own cost). Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cache.read import Reader, ReplicaState  # noqa: E402
from cache.schema import Schema  # noqa: E402
from cache.store import Store  # noqa: E402
from tests.fakesg import FakeSGServer, FakeSite  # noqa: E402
from tests.proxyharness import Proxy  # noqa: E402

FIELDS = ["code", "sg_status_list", "sg_cut_in", "sg_cut_out", "sg_sequence", "project", "description",
          "sg_sequence.Sequence.code"]
FILTERS = [["sg_status_list", "is", "ip"], ["sg_cut_in", "greater_than", 1000]]
ORDER = [{"field_name": "code", "direction": "asc"}]
CONSTANT_ADDON = '''
import socket
from mitmproxy import ctx, http
BODY = open(__file__.replace("constant_addon.py", "constant.json"), "rb").read()
def requestheaders(flow):  # the same quick ACK as sgcache, so only mitmproxy's own cost remains
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    sock = handler.transports[handler.client].writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
def request(flow):
    if flow.request.path.endswith("/api3/json") and b'"read"' in flow.request.content:
        flow.response = http.Response.make(200, BODY, {"Content-Type": "application/json"})
'''


def fill(store: Store, n: int) -> None:
    """N shots over N/100 sequences, one Task and one Version per Shot."""
    project = {"type": "Project", "id": 1, "name": "Bench"}
    schema = store.schema

    def full(entity_type: str, values: dict[str, Any]) -> dict[str, Any]:
        rec = {f: None for f in schema.entities[entity_type].fields}
        rec.update(values)
        return rec

    statuses = ["ip", "fin", "wtg", "hld"]
    with store.engine.begin() as conn:
        store.write_entities(conn, "Project", [full("Project", {"id": 1, "name": "Bench", "archived": False})],
                             "scan", complete=True)
        store.write_entities(conn, "Sequence", [full("Sequence", {"id": s, "code": f"SQ{s:04d}", "project": project})
                                                for s in range(1, n // 100 + 2)], "scan", complete=True)
    for start in range(1, n + 1, 5000):
        ids = range(start, min(n + 1, start + 5000))
        with store.engine.begin() as conn:
            store.write_entities(conn, "Shot", [full("Shot", {
                "id": i, "code": f"sh{i:06d}", "sg_status_list": statuses[i % 4], "sg_cut_in": 990 + i % 50,
                "sg_cut_out": 1100 + i % 50, "description": f"shot number {i}", "project": project,
                "sg_sequence": {"type": "Sequence", "id": i // 100 + 1, "name": f"SQ{i // 100 + 1:04d}"}})
                for i in ids], "scan", complete=True)
            store.write_entities(conn, "Task", [full("Task", {
                "id": i, "content": "comp", "project": project, "sg_status_list": statuses[i % 4],
                "entity": {"type": "Shot", "id": i, "name": f"sh{i:06d}"}}) for i in ids], "scan", complete=True)
            store.write_entities(conn, "Version", [full("Version", {
                "id": i, "code": f"sh{i:06d}_v001", "project": project,
                "entity": {"type": "Shot", "id": i, "name": f"sh{i:06d}"}}) for i in ids], "scan", complete=True)
    with store.engine.begin() as conn:
        for entity_type in schema.entities:
            store.mark_primed(conn, entity_type)


def timed(fn: Any, calls: int) -> list[float]:
    for _ in range(20):
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def describe(label: str, ms: list[float]) -> float:
    med = statistics.median(ms)
    p99 = sorted(ms)[int(len(ms) * 0.99) - 1]
    print(f"{label:<48} median {med:7.3f} ms   p99 {p99:7.3f} ms")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--db", help="replica URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    import shotgun_api3

    tmp = Path(tempfile.mkdtemp(prefix="sgcache-bench-"))
    db_url = args.db or f"sqlite:///{tmp / 'replica.db'}"
    schema_path = REPO / "schema" / "basic.yml"
    store = Store.open(db_url, Schema.load(schema_path))
    t0 = time.perf_counter()
    fill(store, args.shots)
    print(f"filled {args.shots} shots + tasks + versions in {time.perf_counter() - t0:.1f} s ({store.dialect})")

    reader = Reader(store)
    params = {"type": "Shot", "return_fields": FIELDS, "return_only": "active", "sorts": ORDER,
              "filters": {"logical_operator": "and", "conditions": [
                  {"path": p, "relation": r, "values": [v]} for p, r, v in FILTERS]},
              "paging": {"entities_per_page": 50, "current_page": 1}, "return_paging_info_without_counts": False}
    with store.engine.connect() as conn:
        replica_state = ReplicaState(store.primed_fields(conn))
        plan = reader.plan(params, replica_state)
        sql_ms = describe("SQL only (compiled plan, SQLAlchemy execute)", timed(lambda: conn.execute(plan.select).all(), args.calls))
        reader_ms = describe("read engine (plan + SQL + decode)", timed(lambda: reader.read(conn, params, replica_state), args.calls))
        answer = reader.read(conn, params, replica_state)

    site = FakeSite.basic()
    site.add_script("bench", "key")
    site.create_direct("Project", {"name": "Bench"})
    with FakeSGServer(site) as server:
        proxy = Proxy(tmp, db_url, schema_path, ["sgcache_max_lag=0", f"sgcache_site={server.url}", "termlog_verbosity=info"])
        with proxy:
            sg = shotgun_api3.Shotgun(server.url, script_name="bench", api_key="key", http_proxy=proxy.address)
            sg.find_one("Project", [])
            reads_before = site.count("read")
            result = sg.find("Shot", FILTERS, FIELDS, order=ORDER, limit=50)
            assert len(result) == 50 and site.count("read") == reads_before, "not answered from the cache"
            proxy_ms = describe("cached find() via mitmdump, real client", timed(
                lambda: sg.find("Shot", FILTERS, FIELDS, order=ORDER, limit=50), args.calls))
            # an indexed read (one sequence's shots, default order): per-call latency of the client
            light = [["sg_sequence", "is", {"type": "Sequence", "id": 7}]]
            assert len(sg.find("Shot", light, FIELDS, limit=50)) == 50 and site.count("read") == reads_before
            light_ms = describe("cached indexed find() via mitmdump, real client", timed(
                lambda: sg.find("Shot", light, FIELDS, limit=50), args.calls))
        import json

        (tmp / "constant.json").write_text(json.dumps({"results": answer}))
        (tmp / "constant_addon.py").write_text(CONSTANT_ADDON)
        const = Proxy(tmp, db_url, schema_path, ["sgcache_max_lag=0", "termlog_verbosity=info"])
        const_dir = tmp / "const"
        const_dir.mkdir()
        const.workdir = const_dir
        import tests.proxyharness as harness

        saved = harness.ADDON
        harness.ADDON = tmp / "constant_addon.py"
        try:
            with const:
                sg2 = shotgun_api3.Shotgun(server.url, script_name="bench", api_key="key", http_proxy=const.address)
                const_ms = describe("constant answer via mitmdump (mitmproxy's cost)", timed(
                    lambda: sg2.find("Shot", FILTERS, FIELDS, order=ORDER, limit=50), args.calls))
        finally:
            harness.ADDON = saved
    print(f"target: proxy <= 2 x SQL + constant: {proxy_ms:.1f} ms vs {2 * sql_ms + const_ms:.1f} ms")
    print(f"indexed find per call: {light_ms:.2f} ms (target < 5 ms)")
    print(f"ratio engine / SQL:                 {reader_ms / sql_ms:5.2f}x")
    print(f"ratio (proxy - constant) / engine:  {(proxy_ms - const_ms) / reader_ms:5.2f}x")
    print(f"ratio proxy / (engine + constant):  {proxy_ms / (reader_ms + const_ms):5.2f}x")
    store.dispose()


if __name__ == "__main__":
    main()
