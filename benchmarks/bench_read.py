"""Read benchmark: a cached find() through mitmdump vs the same SQL run directly.

    python -m benchmarks.bench_read [--shots 100000] [--db URL] [--calls 300]

Fills a replica with N Shots (plus as many Tasks and Versions), then times, with the
real shotgun_api3 client, a 50-row find() of 8 fields with one deep field answered
through mitmdump; the same read run straight through SQLAlchemy; and mitmdump
answering a constant body (its own cost). Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.support import fill, run_dir  # noqa: E402
from cache.read import Reader, ReplicaState  # noqa: E402
from cache.replica.schema import Schema  # noqa: E402
from cache.replica.store import Store  # noqa: E402
from tests.fakesg import FakeSite  # noqa: E402
from tests.paths import BASIC_SCHEMA  # noqa: E402
from tests.rig import Rig  # noqa: E402

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

    tmp = run_dir("sgcache-bench-")
    db_url = args.db or f"sqlite:///{tmp / 'replica.db'}"
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
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
    site.create_direct("Project", {"name": "Bench"})
    (tmp / "constant.json").write_text(json.dumps({"results": answer}))
    (tmp / "constant_addon.py").write_text(CONSTANT_ADDON)
    with Rig(tmp, db_url, site, schema=BASIC_SCHEMA, prime=None, proxy=False) as rig:
        proxy = rig.start_proxy(["sgcache_max_lag=0", "termlog_verbosity=info"])
        sg = rig.client(proxy)
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
        proxy.stop()  # alone on the machine, the constant proxy next
        const = rig.start_proxy(["sgcache_max_lag=0", "termlog_verbosity=info"], workdir=tmp / "const",
                                addon=tmp / "constant_addon.py")
        sg2 = rig.client(const)
        const_ms = describe("constant answer via mitmdump (mitmproxy's cost)", timed(
            lambda: sg2.find("Shot", FILTERS, FIELDS, order=ORDER, limit=50), args.calls))
    print(f"target: proxy <= 2 x SQL + constant: {proxy_ms:.1f} ms vs {2 * sql_ms + const_ms:.1f} ms")
    print(f"indexed find per call: {light_ms:.2f} ms (target < 5 ms)")
    print(f"ratio engine / SQL:                 {reader_ms / sql_ms:5.2f}x")
    print(f"ratio (proxy - constant) / engine:  {(proxy_ms - const_ms) / reader_ms:5.2f}x")
    print(f"ratio proxy / (engine + constant):  {proxy_ms / (reader_ms + const_ms):5.2f}x")
    store.dispose()


if __name__ == "__main__":
    main()
