"""Throughput of N mitmdump processes on one PostgreSQL replica behind one TCP balancer.

    python -m benchmarks.bench_processes [--db postgresql://...] [--seconds 5] [--processes 1 2]
                                         [--cpu-quota CORES]

The topology of docs/deployment.md ("Several proxies"): one replica on PostgreSQL, one ingester,
N sgcache proxies (mitmdump, each its own process: its own event loop and GIL) and one TCP
balancer in front of them (tests/balancer.py, the stand-in for docs/deploy/haproxy.cfg: least
connections first, a client's kept-alive connection stays on its proxy). The site, the query set
and the clients are bench_hit's (benchmarks/hitset.py): real ``shotgun_api3`` clients, each
cycling through the set of issue 11, every call a hit.

For 1 and 2 processes (``--processes``) and 4 and 16 client threads it prints the calls/s, the
CPU milliseconds the proxies spent per call (from /proc) and how the calls spread over the
proxies; then the ratio of each count to the first. On a machine with fewer cores than proxies
plus clients, the figure says how the proxies share what is left (see the note printed at the end).
``--cpu-quota CORES`` gives each proxy at most CORES of a core (a cgroup CPU quota, what a
container's ``--cpus`` sets; needs a writable cgroup cpu controller): the proxies, not the clients
or PostgreSQL, are then what runs out, and the ratio says whether their throughput grows with the
cores given to them, on a machine too small to give each a core of its own.
"misses" counts the reads SG answered (bench_hit sees a few too: a read may pass while a
proxy refreshes the replica's state).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import shotgun_api3  # noqa: E402

from benchmarks.hitset import build_site, cpu_seconds, nodelay, queries, throughput  # noqa: E402
from benchmarks.support import DEFAULT_PG, CpuQuota, drop_pg, pg_url, run_dir  # noqa: E402
from tests.balancer import Balancer  # noqa: E402
from tests.rig import KEY, SCRIPT, Rig  # noqa: E402


def run(rig: Rig, processes: int, threads_list: list[int], seconds: float,
        quota: float | None = None) -> dict[int, float]:
    """Start ``processes`` proxies behind a balancer (each capped at ``quota`` of a core when
    given); calls/s for each client thread count."""
    proxies = [rig.start_proxy(["termlog_verbosity=info"], workdir=rig.workdir / f"proxy{n}-of-{processes}",
                               capture=False) for n in range(processes)]
    groups = [CpuQuota(quota) for _ in proxies] if quota else []
    for group, proxy in zip(groups, proxies, strict=False):  # no groups: no cap
        group.add(proxy.proc.pid)
    balancer = Balancer({f"proxy{n}": ("127.0.0.1", p.port) for n, p in enumerate(proxies)}).start()
    direct = rig.direct()
    calls = [call for _, call in queries(direct)]

    def client() -> Any:
        return shotgun_api3.Shotgun(rig.url, script_name=SCRIPT, api_key=KEY,
                                    http_proxy=f"127.0.0.1:{balancer.port}")

    try:
        # every proxy learns the credentials and plans the set (one client per proxy: least connections)
        warm = [client() for _ in proxies]
        for sg in warm:
            for call in calls:
                call(sg)
        for sg in warm:
            nodelay(sg)
            for _ in range(3):
                for call in calls:
                    call(sg)
        rates = {}
        for threads in threads_list:
            before_reads = rig.site.count_by_script("read", SCRIPT)
            cpu0 = [cpu_seconds(p.proc.pid) for p in proxies]
            served0 = dict(balancer.served)
            throttled0 = sum(g.throttled_seconds() for g in groups)
            t0 = time.process_time()
            rate = throughput(client, calls, threads, seconds)
            own = time.process_time() - t0
            cpu = [cpu_seconds(p.proc.pid) - c for p, c in zip(proxies, cpu0, strict=True)]
            n = rate * seconds
            misses = rig.site.count_by_script("read", SCRIPT) - before_reads
            spread = "/".join(str(balancer.served[k] - served0[k]) for k in balancer.served)
            rates[threads] = rate
            waited = sum(g.throttled_seconds() for g in groups) - throttled0
            capped = f"; capped at {quota:g} core each, waited for it {waited:.1f} s in all" if groups else ""
            print(f"{processes} process(es), {threads:>2} client threads: {rate:6.1f} calls/s; "
                  f"proxies {1000 * sum(cpu) / n:5.2f} CPU-ms/call ({100 * sum(cpu) / seconds:3.0f}% of a core), "
                  f"clients+balancer+site {100 * own / seconds:3.0f}% of a core; connections per proxy {spread}; "
                  f"misses {misses}{capped}")
        return rates
    finally:
        balancer.stop()
        for p in proxies:
            p.stop()
        for group in groups:
            group.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=os.environ.get("SGCACHE_TEST_DB") or DEFAULT_PG,
                        help=f"PostgreSQL server (a schema of its own is made and dropped; default {DEFAULT_PG})")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--cpu-quota", type=float, metavar="CORES",
                        help="cap each proxy at this much of a core (a cgroup CPU quota), e.g. 0.25")
    args = parser.parse_args()
    if args.cpu_quota and not CpuQuota.available():
        parser.error("--cpu-quota needs a writable cgroup cpu controller (cpu.max or cpu.cfs_quota_us)")

    made = pg_url(args.db)
    if made is None:
        return
    url, schema = made
    tmp = run_dir("sgcache-bench-processes-")
    try:
        rig = Rig(tmp, url, populate_site=build_site, proxy=False, ingester=True, poll_interval=1.0)
        with rig:
            print(f"{os.cpu_count()} cores; replica PostgreSQL; one ingester; balancer tests/balancer.py"
                  + (f"; each proxy capped at {args.cpu_quota:g} of a core" if args.cpu_quota else ""))
            results = {n: run(rig, n, args.threads, args.seconds, args.cpu_quota) for n in args.processes}
    finally:
        drop_pg(args.db, schema)
    first = args.processes[0]
    for n in args.processes[1:]:
        print(" ".join(f"{threads} threads: {n}/{first} processes {results[n][threads] / results[first][threads]:.2f}x;"
                       for threads in args.threads))
    if not args.cpu_quota:
        print("Note: the clients, the balancer and the fake site run in this process, PostgreSQL and the ingester "
              "beside it; with fewer cores than all of them, a second proxy can only take what they leave idle "
              "(--cpu-quota caps each proxy, so that the proxies are what runs out).")


if __name__ == "__main__":
    main()
