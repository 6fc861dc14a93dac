"""Abuse benchmark: do other clients' hits keep their speed beside one abusive client?

    python -m benchmarks.bench_abuse [--shots 20000] [--db URL] [--rounds 4] [--window 8] [--clients 2] [--vary-slow]

Fills a replica with N Shots (benchmarks.support.fill, as bench_read does) and runs mitmdump in front of a fake SG.
Normal clients (each its own process, the real shotgun_api3 client) time small cached finds while one
abusive client (another process) is switched on and off in alternate windows (so the machine's own
load falls on both sides alike). When on, it alternates 30,000-link ``in`` reads
and deliberately slow reads (300 case-insensitive ``contains`` tests on every Shot, far past the
per-read budget; ``--vary-slow`` makes each one a new request, so only the budget bounds them). Prints the normal clients' hit p50/p95 in both runs, their ratio (target: within
1.5x), and the proxy's pass counts (no ``db-backoff`` expected). Asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.support import fill, run_dir  # noqa: E402
from tests.fakesg import FakeSite  # noqa: E402
from tests.paths import BASIC_SCHEMA  # noqa: E402
from tests.rig import KEY, SCRIPT, Rig  # noqa: E402

NORMAL = ("Shot", [["sg_sequence", "is", {"type": "Sequence", "id": 7}]], ["code", "sg_status_list", "sg_cut_in"])
HUGE = [["sg_sequence", "in", [{"type": "Sequence", "id": i} for i in range(1, 30_001)]]]


def slow_filters(salt: str = "") -> list[Any]:
    """300 case-insensitive 'contains' tests on every Shot: seconds of work, past the budget."""
    return [{"filter_operator": "any", "filters": [["description", "contains", f"nowhere {salt}{i}"]
                                                   for i in range(300)]}]


def _client(url: str, proxy: str | None) -> Any:
    import shotgun_api3

    return shotgun_api3.Shotgun(url, script_name=SCRIPT, api_key=KEY, http_proxy=proxy)


def normal_client(url: str, proxy: str, seconds: float, out: Any, ready: Any) -> None:
    """Warm up (then say so on ``ready``), time small cached finds for ``seconds``; put (monotonic time,
    latency ms) pairs on ``out``."""
    sg = _client(url, proxy)
    for _ in range(20):
        sg.find(*NORMAL, limit=20)
    ready.put(True)
    times: list[tuple[float, float]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        sg.find(*NORMAL, limit=20)
        times.append((time.monotonic(), (time.perf_counter() - t0) * 1000))
    out.put(times)


def abusive_client(url: str, proxy: str | None, active: Any, stop: Any, out: Any, vary: bool) -> None:
    """While ``active`` is set, alternate a 30,000-link ``in`` read and a deliberately slow read
    (with ``vary``, every slow read is a new request: the proxy cannot remember it)."""
    sg = _client(url, proxy)
    done: dict[str, list[float]] = {"huge": [], "slow": []}
    n = 0
    while not stop.is_set():
        if not active.wait(0.05):
            continue
        n += 1
        for kind, filters in (("huge", HUGE), ("slow", slow_filters(str(n) if vary else ""))):
            t0 = time.perf_counter()
            sg.find("Shot", filters, ["code"], limit=50)
            done[kind].append((time.perf_counter() - t0) * 1000)
    out.put(done)


def run(url: str, proxy: str, n_clients: int, rounds: int, window: float, vary: bool,
        abuse_direct: bool = False) -> tuple[list[float], list[float]]:
    """Normal clients run throughout; the abusive client is on in every other window (so the
    machine's own load falls on both sides alike). Samples in a window's first second are dropped."""
    ctx = multiprocessing.get_context("spawn")
    out, ready, active, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    abuser = ctx.Process(target=abusive_client, args=(url, None if abuse_direct else proxy, active, stop, out, vary))
    abuser.start()
    total = rounds * 2 * window + 5.0
    workers = [ctx.Process(target=normal_client, args=(url, proxy, total, out, ready)) for _ in range(n_clients)]
    for w in workers:
        w.start()
    for _ in workers:  # every client started and warmed up
        ready.get(timeout=120)
    windows: list[tuple[float, float, bool]] = []
    for _ in range(rounds):
        for loud in (False, True):
            (active.set if loud else active.clear)()
            begin = time.monotonic()
            time.sleep(window)
            windows.append((begin + 1.0, time.monotonic(), loud))
    active.clear()
    samples: list[tuple[float, float]] = []
    for _ in workers:
        samples += out.get(timeout=total + 120)
    stop.set()
    abuse_times = out.get(timeout=120)
    for w in [*workers, abuser]:
        w.join()
    for kind, ms in abuse_times.items():
        if ms:
            print(f"  abusive {kind:<5} reads: {len(ms):4d}, median {statistics.median(ms):8.1f} ms")
    quiet, loud_ms = [], []
    for at, ms in samples:
        for begin, end, loud in windows:
            if begin <= at < end:
                (loud_ms if loud else quiet).append(ms)
    return quiet, loud_ms


def describe(label: str, ms: list[float]) -> tuple[float, float]:
    p50 = statistics.median(ms)
    p95 = sorted(ms)[max(0, int(len(ms) * 0.95) - 1)]
    print(f"{label:<36} {len(ms):6d} hits   p50 {p50:7.2f} ms   p95 {p95:7.2f} ms")
    return p50, p95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=4, help="quiet/abused window pairs")
    parser.add_argument("--window", type=float, default=8.0, help="seconds per window")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--db", help="replica URL (default: a temporary SQLite file)")
    parser.add_argument("--vary-slow", action="store_true",
                        help="make every slow read a new request (measures the per-read budget alone)")
    parser.add_argument("--abuse-direct", action="store_true",
                        help="control run: the abusive client talks to the fake SG without the proxy "
                             "(what its load costs the machine, whatever the proxy does)")
    args = parser.parse_args()

    tmp = run_dir("sgcache-abuse-")
    db_url = args.db or f"sqlite:///{tmp / 'replica.db'}"
    site = FakeSite.basic()
    site.create_direct("Project", {"name": "Bench"})
    with Rig(tmp, db_url, site, schema=BASIC_SCHEMA, prime=None, proxy=False) as rig:
        fill(rig.open_store(create=True), args.shots)
        print(f"replica: {args.shots} shots ({db_url.split(':', 1)[0]})")
        proxy = rig.start_proxy(["sgcache_max_lag=0", "sgcache_hosts=127.0.0.1"])
        sg = rig.client()
        sg.find_one("Project", [])  # SG accepts the script: hits from here on
        before = site.count("read")
        assert sg.find(*NORMAL, limit=20) and site.count("read") == before, "the normal read is not a hit"
        quiet_ms, loud_ms = run(rig.url, proxy.address, args.clients, args.rounds, args.window,
                                 args.vary_slow, args.abuse_direct)
        quiet = describe("others alone", quiet_ms)
        loud = describe("others beside the abusive client", loud_ms)
        passes = sg.info()["sgcache"]["passes"]
    print(f"p50 ratio (with / without abuse): {loud[0] / quiet[0]:5.2f}x (target <= 1.5x)")
    print(f"p95 ratio (with / without abuse): {loud[1] / quiet[1]:5.2f}x")
    print(f"proxy passes: {dict(sorted(passes.items()))}")


if __name__ == "__main__":
    main()
