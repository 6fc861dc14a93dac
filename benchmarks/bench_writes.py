"""Write benchmark: a write direct to SG against the same write through sgcache (issue 11, target 5).

    python -m benchmarks.bench_writes [--writes 100] [--seconds 5] [--clients 16] [--db URL] [--profile DIR]

The site of bench_hit (about 2,000 rows), primed by ``scripts/scan --full``, the ingester
running, one sgcache mitmdump. With the real ``shotgun_api3`` client (Nagle off, as bench_hit):

- write p50: an ``update`` of one field, direct and through sgcache, interleaved call by call
  (the machine's noise hits both alike), with the mitmdump's CPU milliseconds per write (/proc);
- mixed load: ``--clients`` threads, each doing one write in ten and bench_hit's query set
  otherwise, for ``--seconds`` direct then through sgcache: calls/s, write and read p50, the ratio.

Each proxied write must read back at once through the proxy (the writer reads its own write).
``--profile DIR`` runs the mitmdump under cProfile (DIR/sgcache.prof at exit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the site and the reads of the hit benchmark (the one benchmark that imports another)
from benchmarks.hitset import build_site, cpu_seconds, nodelay_after, queries, run_threads  # noqa: E402
from tests.rig import Rig  # noqa: E402


def write_p50(direct: Any, proxied: Any, shot_id: int, writes: int, pid: int) -> tuple[float, float, float]:
    """(direct p50 ms, proxied p50 ms, proxy CPU-ms per write), interleaved direct/proxied."""
    n = [0]

    def update(sg: Any) -> float:
        n[0] += 1
        t0 = time.perf_counter()
        sg.update("Shot", shot_id, {"description": f"write {n[0]}"})
        return (time.perf_counter() - t0) * 1000

    for _ in range(max(5, writes // 10)):
        update(direct)
        update(proxied)
    d, p, cpu = [], [], 0.0
    for _ in range(writes):
        d.append(update(direct))
        cpu0 = cpu_seconds(pid)
        p.append(update(proxied))
        cpu += cpu_seconds(pid) - cpu0
    # the writer reads its own write, through the proxy, at once
    want = f"write {n[0]}"
    got = proxied.find_one("Shot", [["id", "is", shot_id]], ["description"])["description"]
    assert got == want, f"read after write: {got!r}, wanted {want!r}"
    return statistics.median(d), statistics.median(p), 1000 * cpu / writes


def mixed(make_client: Callable[[], Any], shot_ids: list[int], reads_set: list[Callable[[Any], Any]],
          threads: int, seconds: float) -> tuple[float, float, float]:
    """(calls/s, write p50 ms, read p50 ms) of ``threads`` clients, each writing one call in ten."""
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
    rate = sum(done) / elapsed
    return rate, statistics.median(writes) if writes else float("nan"), statistics.median(reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=100, help="timed writes per path")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each mixed-load run")
    parser.add_argument("--clients", type=int, default=16, help="client threads of the mixed load")
    parser.add_argument("--db", help="replica URL (default: a temporary SQLite file)")
    parser.add_argument("--profile", type=Path, help="run the mitmdump under cProfile, output in this dir")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sgcache-bench-writes-"))
    db_url = args.db or f"sqlite:///{tmp / 'replica.db'}"
    with Rig(tmp, db_url, populate_site=build_site, proxy=False, ingester=True, poll_interval=1.0) as rig:
        prefix: list[str] = []
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            prefix = [sys.executable, "-m", "cProfile", "-o", str(args.profile / "sgcache.prof")]
        verbosity = os.environ.get("BENCH_VERBOSITY", "info")
        proxy = rig.start_proxy([f"termlog_verbosity={verbosity}"], capture=False, prefix=prefix)
        direct, proxied = nodelay_after(rig.direct()), nodelay_after(rig.client(proxy))
        shot_ids = [s["id"] for s in direct.find("Shot", [], ["id"], limit=args.clients)]
        reads_set = [call for _, call in queries(direct)]
        print(f"replica {db_url.split(':')[0]}; sgcache at {REPO}")
        wd, wp, wc = write_p50(direct, proxied, shot_ids[0], args.writes, proxy.proc.pid)
        print(f"write p50: direct {wd:.2f} ms, through sgcache {wp:.2f} ms (+{wp - wd:.2f} ms; "
              f"{wc:.2f} CPU-ms/write in mitmdump)")
        rd, dw, dr = mixed(rig.direct, shot_ids, reads_set, args.clients, args.seconds)
        cpu0 = cpu_seconds(proxy.proc.pid)
        rp, pw, pr = mixed(lambda: rig.client(proxy), shot_ids, reads_set, args.clients, args.seconds)
        cpu = 1000 * (cpu_seconds(proxy.proc.pid) - cpu0) / (rp * args.seconds)
        print(f"{args.clients} clients, 10% writes: direct {rd:.1f} calls/s (write p50 {dw:.1f} ms, read {dr:.1f} ms); "
              f"sgcache {rp:.1f} calls/s (write p50 {pw:.1f} ms, read {pr:.1f} ms; {cpu:.2f} CPU-ms/call); "
              f"sgcache/direct {rp / rd:.2f}x")
    if args.profile:
        print(f"profile: {args.profile / 'sgcache.prof'}")


if __name__ == "__main__":
    main()
