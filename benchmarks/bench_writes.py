"""Write benchmark: a write direct to SG against the same write through sgcache (issue 11, target 5).

    python -m benchmarks.bench_writes [--writes 100] [--seconds 5] [--clients 16] [--db URL] [--profile DIR]
        [--compare CHECKOUT]

The site of bench_hit (about 2,000 rows), primed by ``scripts/scan --full``, the ingester
running, one sgcache mitmdump. With the real ``shotgun_api3`` client (Nagle off, as bench_hit):

- write p50: an ``update`` of one field, direct, through a bare mitmproxy relay (the floor addon
  of bench_hit, which passes every write untouched: what mitmproxy itself adds to a write) and
  through sgcache, interleaved call by call (the machine's noise hits all alike), with each
  mitmdump's CPU milliseconds per write (/proc);
- mixed load: ``--clients`` threads, each doing one write in ten and bench_hit's query set
  otherwise, for ``--seconds`` direct and through sgcache (half in one order, half in the
  other): calls/s, write and read p50, the ratio, and how many of the reads SG answered (a read
  the proxy passed: a write it cannot be sure of yet, ``pending-write``, is the usual reason).

``--compare CHECKOUT`` also runs another checkout's sgcache (bench_hit's option of that name) on
the same replica, taking turns with the rest in both measures.

Each proxied write must read back at once through the proxy (the writer reads its own write).
``--profile DIR`` runs the mitmdump under cProfile (DIR/sgcache.prof at exit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the site and the reads of the hit benchmark (the one benchmark that imports another)
from benchmarks.hitset import build_site, cpu_seconds, nodelay_after, queries, run_threads  # noqa: E402
from benchmarks.support import bench_replica, run_dir  # noqa: E402
from tests.rig import SCRIPT, Rig  # noqa: E402

#: The floor of bench_hit: it relays every write untouched (a bare mitmproxy relay, for writes).
FLOOR = REPO / "benchmarks" / "floor_addon.py"


def write_p50(direct: Any, proxies: list[tuple[Any, int]], shot_id: int,
              writes: int, relays: int = 0) -> tuple[float, list[tuple[float, float]]]:
    """(direct p50 ms, [(p50 ms, CPU-ms per write of its mitmdump)] of each (client, pid) in
    ``proxies``), the paths taking turns call by call. The first ``relays`` proxies only relay
    (they are not asked to read the write back)."""
    n = [0]

    def update(sg: Any) -> float:
        n[0] += 1
        t0 = time.perf_counter()
        sg.update("Shot", shot_id, {"description": f"write {n[0]}"})
        return (time.perf_counter() - t0) * 1000

    for _ in range(max(5, writes // 10)):
        update(direct)
        for client, _ in proxies:
            update(client)
    d: list[float] = []
    p: list[list[float]] = [[] for _ in proxies]
    cpu = [0.0] * len(proxies)
    for _ in range(writes):
        d.append(update(direct))
        for k, (client, pid) in enumerate(proxies):
            cpu0 = cpu_seconds(pid)
            p[k].append(update(client))
            cpu[k] += cpu_seconds(pid) - cpu0
    for client, _ in proxies[relays:]:  # each writer reads its own write, through its proxy, at once
        update(client)
        want = f"write {n[0]}"
        got = client.find_one("Shot", [["id", "is", shot_id]], ["description"])["description"]
        assert got == want, f"read after write: {got!r}, wanted {want!r}"
    return statistics.median(d), [(statistics.median(t), 1000 * c / writes) for t, c in zip(p, cpu, strict=True)]


def mixed(make_client: Callable[[], Any], shot_ids: list[int], reads_set: list[Callable[[Any], Any]],
          threads: int, seconds: float) -> tuple[int, float, list[float], list[float]]:
    """(calls made, seconds, write times ms, read times ms) of ``threads`` clients, each writing one
    call in ten."""
    clients = [nodelay_after(make_client()) for _ in range(threads)]
    writes: list[float] = []
    reads: list[float] = []
    done = [0] * threads
    stop = threading.Event()

    def work(k: int) -> None:
        sg, shot = clients[k], shot_ids[k % len(shot_ids)]
        i = k  # threads start at different points of the cycle
        while not stop.is_set():
            t0 = time.perf_counter()
            if i % 10 == 0:
                sg.update("Shot", shot, {"description": f"mixed {k} {i}"})
                writes.append((time.perf_counter() - t0) * 1000)
            else:
                reads_set[i % len(reads_set)](sg)
                reads.append((time.perf_counter() - t0) * 1000)
            i += 1
            done[k] += 1

    elapsed = run_threads(work, threads, seconds, stop)  # before counting what was done
    return sum(done), elapsed, writes, reads


def p50_or_nan(times: list[float]) -> float:
    return statistics.median(times) if times else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=100, help="timed writes per path")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each mixed-load run")
    parser.add_argument("--clients", type=int, default=16, help="client threads of the mixed load")
    parser.add_argument("--db", help="replica URL (default: a temporary SQLite file)")
    parser.add_argument("--profile", type=Path, help="run the mitmdump under cProfile, output in this dir")
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="also run another checkout's sgcache on the same replica, in turns with the rest")
    args = parser.parse_args()

    tmp = run_dir("sgcache-bench-writes-")
    with bench_replica(args.db, tmp) as db_url:
        run(args, tmp, db_url)


def run(args: argparse.Namespace, tmp: Path, db_url: str) -> None:
    """The benchmark on the replica at ``db_url`` (made here)."""
    with Rig(tmp, db_url, populate_site=build_site, proxy=False, ingester=True, poll_interval=1.0) as rig:
        prefix: list[str] = []
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            prefix = [sys.executable, "-m", "cProfile", "-o", str(args.profile / "sgcache.prof")]
        verbosity = os.environ.get("BENCH_VERBOSITY", "info")
        proxy = rig.start_proxy([f"termlog_verbosity={verbosity}"], capture=False, prefix=prefix)
        targets = {"sgcache": proxy}
        if args.compare:  # another checkout's sgcache on the same replica (see bench_hit)
            other = args.compare.resolve()
            targets["compare"] = rig.start_proxy([f"termlog_verbosity={verbosity}"], capture=False,
                                                 workdir=tmp / "compare", addon=other / "addons" / "sgcache.py",
                                                 env={"PYTHONPATH": str(other)})
        relay = rig.start_proxy(["termlog_verbosity=info"], addon=FLOOR, workdir=tmp / "relay", capture=False)
        direct = nodelay_after(rig.direct())
        shot_ids = [s["id"] for s in direct.find("Shot", [], ["id"], limit=args.clients)]
        reads_set = [call for _, call in queries(direct)]
        print(f"replica {db_url.split(':')[0]}; sgcache at {REPO}"
              + (f"; compare: the sgcache of {args.compare.resolve()}" if args.compare else ""))
        wd, measured = write_p50(direct, [(nodelay_after(rig.client(px)), px.proc.pid)
                                          for px in [relay, *targets.values()]], shot_ids[0], args.writes, relays=1)
        print(f"write p50: direct {wd:.2f} ms" + "".join(
            f", through {name} {wp:.2f} ms (+{wp - wd:.2f} ms; {wc:.2f} CPU-ms/write in mitmdump)"
            for name, (wp, wc) in zip(["a bare mitmproxy relay", *targets], measured, strict=True)))
        # the mixed load: each path in turn, then again in the reverse order (no order favoured)
        makers: dict[str, Callable[[], Any]] = {"direct": rig.direct}
        makers.update({name: (lambda px=px: rig.client(px)) for name, px in targets.items()})
        made = dict.fromkeys(makers, 0)
        took = dict.fromkeys(makers, 0.0)
        cpu = dict.fromkeys(targets, 0.0)
        passed = dict.fromkeys(targets, 0)  # the clients' reads SG answered (not the ingester's)
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in makers}
        for order in (list(makers), list(makers)[::-1]):
            for name in order:
                px = targets.get(name)
                cpu0 = cpu_seconds(px.proc.pid) if px is not None else 0.0
                reads0 = rig.site.count_by_script("read", SCRIPT)
                calls, seconds, writes, reads = mixed(makers[name], shot_ids, reads_set, args.clients, args.seconds / 2)
                if px is not None:
                    cpu[name] += cpu_seconds(px.proc.pid) - cpu0
                    passed[name] += rig.site.count_by_script("read", SCRIPT) - reads0
                made[name] += calls
                took[name] += seconds
                times[name][0].extend(writes)
                times[name][1].extend(reads)
        rate = {name: made[name] / took[name] for name in makers}
        line = (f"{args.clients} clients, 10% writes: direct {rate['direct']:.1f} calls/s "
                f"(write p50 {p50_or_nan(times['direct'][0]):.1f} ms, read {p50_or_nan(times['direct'][1]):.1f} ms)")
        for name in targets:
            line += (f"; {name} {rate[name]:.1f} calls/s (write p50 {p50_or_nan(times[name][0]):.1f} ms, "
                     f"read {p50_or_nan(times[name][1]):.1f} ms; {1000 * cpu[name] / made[name]:.2f} CPU-ms/call; "
                     f"{rate[name] / rate['direct']:.2f}x direct; SG answered {passed[name]} of its "
                     f"{len(times[name][1])} reads)")
        print(line)
    if args.profile:
        print(f"profile: {args.profile / 'sgcache.prof'}")


if __name__ == "__main__":
    main()
