"""Abuse benchmark: do other clients' hits keep their speed beside one abusive client?

    python -m benchmarks.bench_abuse [--shots 20000] [--db URL] [--seconds 20] [--clients 2]

Fills a replica with N Shots (as benchmarks.bench_read does) and runs mitmdump in front of a fake SG.
Normal clients (each its own process, the real shotgun_api3 client) time small cached finds, first
alone, then beside one abusive client (another process) that alternates 30,000-link ``in`` reads
and deliberately slow reads (300 case-insensitive ``contains`` tests on every Shot, far past the
per-read budget). Prints the normal clients' hit p50/p95 in both runs, their ratio (target: within
1.5x), and the proxy's pass counts (no ``db-backoff`` expected). Asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_read import fill  # noqa: E402
from cache.schema import Schema  # noqa: E402
from cache.store import Store  # noqa: E402
from tests.fakesg import FakeSGServer, FakeSite  # noqa: E402
from tests.proxyharness import Proxy  # noqa: E402

SCRIPT, KEY = "bench", "key"
NORMAL = ("Shot", [["sg_sequence", "is", {"type": "Sequence", "id": 7}]], ["code", "sg_status_list", "sg_cut_in"])
HUGE = [["sg_sequence", "in", [{"type": "Sequence", "id": i} for i in range(1, 30_001)]]]
SLOW = [{"filter_operator": "any", "filters": [["description", "contains", f"nowhere {i}"] for i in range(300)]}]


def _client(url: str, proxy: str) -> Any:
    import shotgun_api3

    return shotgun_api3.Shotgun(url, script_name=SCRIPT, api_key=KEY, http_proxy=proxy)


def normal_client(url: str, proxy: str, seconds: float, out: Any) -> None:
    """Time small cached finds for ``seconds``; put the latencies (ms) on ``out``."""
    sg = _client(url, proxy)
    for _ in range(20):
        sg.find(*NORMAL, limit=20)
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        sg.find(*NORMAL, limit=20)
        times.append((time.perf_counter() - t0) * 1000)
    out.put(times)


def abusive_client(url: str, proxy: str, stop: Any, out: Any) -> None:
    """Alternate a 30,000-link ``in`` read and a deliberately slow read until ``stop`` is set."""
    sg = _client(url, proxy)
    done = {"huge": [], "slow": []}
    while not stop.is_set():
        for kind, filters in (("huge", HUGE), ("slow", SLOW)):
            t0 = time.perf_counter()
            sg.find("Shot", filters, ["code"], limit=50)
            done[kind].append((time.perf_counter() - t0) * 1000)
    out.put(done)


def run(url: str, proxy: str, n_clients: int, seconds: float, abuse: bool) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    abuser = None
    if abuse:
        abuser = ctx.Process(target=abusive_client, args=(url, proxy, stop, out))
        abuser.start()
        time.sleep(2.0)  # let the abuse start before the measurement
    workers = [ctx.Process(target=normal_client, args=(url, proxy, seconds, out)) for _ in range(n_clients)]
    for w in workers:
        w.start()
    times: list[float] = []
    for _ in workers:
        times += out.get(timeout=seconds + 120)
    for w in workers:
        w.join()
    if abuser is not None:
        stop.set()
        abuse_times = out.get(timeout=120)
        abuser.join()
        for kind, ms in abuse_times.items():
            if ms:
                print(f"  abusive {kind:<5} reads: {len(ms):4d}, median {statistics.median(ms):8.1f} ms")
    return times


def describe(label: str, ms: list[float]) -> tuple[float, float]:
    p50 = statistics.median(ms)
    p95 = sorted(ms)[max(0, int(len(ms) * 0.95) - 1)]
    print(f"{label:<36} {len(ms):6d} hits   p50 {p50:7.2f} ms   p95 {p95:7.2f} ms")
    return p50, p95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--db", help="replica URL (default: a temporary SQLite file)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sgcache-abuse-"))
    db_url = args.db or f"sqlite:///{tmp / 'replica.db'}"
    schema_path = REPO / "schema" / "basic.yml"
    store = Store.open(db_url, Schema.load(schema_path))
    fill(store, args.shots)
    store.dispose()
    print(f"replica: {args.shots} shots ({db_url.split(':', 1)[0]})")

    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    site.create_direct("Project", {"name": "Bench"})
    with FakeSGServer(site) as server, Proxy(tmp, db_url, schema_path,
                                             ["sgcache_max_lag=0", "sgcache_hosts=127.0.0.1"]) as proxy:
        sg = _client(server.url, proxy.address)
        sg.find_one("Project", [])  # SG accepts the script: hits from here on
        before = site.count("read")
        assert sg.find(*NORMAL, limit=20) and site.count("read") == before, "the normal read is not a hit"
        quiet = describe("others alone", run(server.url, proxy.address, args.clients, args.seconds, False))
        loud = describe("others beside the abusive client",
                        run(server.url, proxy.address, args.clients, args.seconds, True))
        passes = sg.info()["sgcache"]["passes"]
    print(f"p50 ratio (with / without abuse): {loud[0] / quiet[0]:5.2f}x (target <= 1.5x)")
    print(f"p95 ratio (with / without abuse): {loud[1] / quiet[1]:5.2f}x")
    print(f"proxy passes: {dict(sorted(passes.items()))}")


if __name__ == "__main__":
    main()
