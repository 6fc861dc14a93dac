"""Freshness benchmark: time from a change at the fake SG to the change being visible through the proxy.

    python -m benchmarks.bench_freshness [--n 100] [--poll-interval 1] [--pg URL | --pg '']

Rig (tests/rig.py, with the ingester): the fake SG server, scripts/scan --full, a running
scripts/ingest-events --poll-interval P and mitmdump with the addon (sgcache_site=<the fake's URL>,
the default sgcache_max_lag). N times: update a Shot's code directly at the fake, then
``find`` it through a real shotgun_api3 client (http_proxy) until an answer that the fake
did not serve (a cache hit) shows the new value; the delay is from the update to that
answer. Prints median/p95/p99 and the ratio of p99 to the target, P + 1 s. Asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.support import DEFAULT_PG, drop_pg, pg_url  # noqa: E402
from cache.replica.statekeys import INGESTER_HEARTBEAT as K_HEARTBEAT  # noqa: E402
from tests.fakesg import FakeSite  # noqa: E402
from tests.rig import Rig  # noqa: E402


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(name: str, url: str, n: int, poll: float, seed: int, idle_max: float | None = None) -> None:
    site = FakeSite.basic()
    proj = site.create_direct("Project", {"name": "Bench"})
    shots = [site.create_direct("Shot", {"code": f"sh{i:03d}", "project": proj}) for i in range(20)]
    rng = random.Random(seed)
    delays: list[float] = []
    misses = 0
    with tempfile.TemporaryDirectory() as tmp, Rig(Path(tmp), url, site, ingester=True, poll_interval=poll,
                                                    ingest_args=() if idle_max is None else
                                                    ("--idle-max", str(idle_max))) as rig:
        rig.wait(lambda: rig.state(K_HEARTBEAT), timeout=30, what="the ingester's first poll")
        for i in range(n):
            time.sleep(rng.uniform(0, poll))  # changes land at random points of the poll cycle
            shot = rng.choice(shots)
            code = f"v{i}"
            t0 = time.monotonic()
            site.update_direct("Shot", shot["id"], {"code": code})
            _elapsed, missed = rig.wait_hit(lambda s=shot: rig.reader.find("Shot", [["id", "is", s["id"]]], ["code"]),
                                            lambda r, c=code: bool(r) and r[0]["code"] == c, timeout=30, pause=0.01)
            delays.append(time.monotonic() - t0)
            misses += missed
    target = max(poll, idle_max or poll) + 1.0
    p50, p95, p99 = statistics.median(delays), quantile(delays, 0.95), quantile(delays, 0.99)
    print(f"{name:<10} n={n} poll={poll:g}s: median {p50:.3f}s  p95 {p95:.3f}s  p99 {p99:.3f}s  "
          f"max {max(delays):.3f}s  p99/(poll+1s) = {p99 / target:.2f}  "
          f"({'within' if p99 <= target else 'OVER'} target {target:g}s; {misses} reads passed upstream, "
          f"not counted as visible)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL base URL ('' to skip)")
    parser.add_argument("--sqlite", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--idle-max", type=float, default=None,
                        help="the ingester's idle back-off ceiling (default: none, to measure the poll pipeline; "
                             "the ingester's own default is 3 s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            run("SQLite", f"sqlite:///{tmp}/fresh.db", args.n, args.poll_interval, args.seed, args.idle_max)
    if args.pg:
        made = pg_url(args.pg)
        if made:
            try:
                run("PostgreSQL", made[0], args.n, args.poll_interval, args.seed, args.idle_max)
            finally:
                drop_pg(args.pg, made[1])


if __name__ == "__main__":
    main()
