"""Hit benchmark: sgcache hits against the floor (an addon replaying answers from memory) and SG direct.

    python -m benchmarks.bench_hit [--calls 200] [--seconds 5] [--rounds 5] [--db URL] [--no-ingester] [--profile DIR]
        [--compare CHECKOUT] [--set OPTION=VALUE]

A fake SG site with about 2,000 rows (Shots, Tasks, Versions, Assets, Steps), primed by
``scripts/scan --full``, the ingester running; two mitmdump processes side by side: sgcache
(``addons/sgcache.py``) and the floor (``benchmarks/floor_addon.py``). For the query set of
issue 11, with the real ``shotgun_api3`` client, prints the p50 of each query direct / floor /
sgcache and the ratio hit / floor (client Nagle off, as in the issue's table), the real client
as shipped (Nagle on), the calls/s with 4 and 16 client threads (floor and sgcache taking turns in
``--rounds`` slices; the lowest and highest of the slices' ratios show how far the machine's
noise moves the total), and the CPU milliseconds each
mitmdump spends per call (from /proc: a figure that does not depend on how busy the machine is).
Latency figures on a shared machine are noisy: compare the ratios measured in one run.
``--profile DIR`` runs sgcache's mitmdump under cProfile (DIR/sgcache.prof at exit).
``--compare CHECKOUT`` runs a second sgcache, another checkout's (a ``git worktree`` or ``git
archive`` of an older commit), on the same replica, measured in turns with the rest: a change's
before and after from one run, which a machine whose speed drifts between runs cannot give.
Asserts only that sgcache's answers are hits and equal SG's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.hitset import (  # noqa: E402
    build_site,
    cpu_seconds,
    nodelay_after,
    queries,
    sigterm_under_load,
    throughput,
)
from benchmarks.support import bench_replica, run_dir  # noqa: E402
from tests.rig import SCRIPT, Rig  # noqa: E402

FLOOR = REPO / "benchmarks" / "floor_addon.py"


def p50(fn: Callable[[], Any], calls: int, pid: int | None = None) -> tuple[float, float]:
    """(p50 ms of ``calls`` calls of ``fn``, CPU-ms process ``pid`` spent per call)."""
    for _ in range(max(5, calls // 10)):
        fn()
    out = []
    cpu0 = cpu_seconds(pid) if pid else 0.0
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    cpu = 1000 * (cpu_seconds(pid) - cpu0) / calls if pid else 0.0
    return statistics.median(out), cpu


def p50_side_by_side(paths: list[tuple[Callable[[], Any], int | None]], calls: int) -> list[tuple[float, float]]:
    """:func:`p50` of several paths measured in turns (one call of each, then again): [(p50 ms,
    CPU-ms of its process per call)]. The CPU of a process is read around the whole run, so each
    process must serve only its own path's calls."""
    for fn, _ in paths:
        for _ in range(max(5, calls // 10)):
            fn()
    times: list[list[float]] = [[] for _ in paths]
    cpu0 = [cpu_seconds(pid) if pid else 0.0 for _, pid in paths]
    for _ in range(calls):
        for (fn, _), out in zip(paths, times, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return [(statistics.median(out), 1000 * (cpu_seconds(pid) - c0) / calls if pid else 0.0)
            for (_, pid), out, c0 in zip(paths, times, cpu0, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per query and path")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--rounds", type=int, default=5, help="slices each throughput run takes turns in")
    parser.add_argument("--db", help="replica URL (default: a temporary SQLite file)")
    parser.add_argument("--no-ingester", action="store_true", help="no ingester (sgcache_max_lag=0)")
    parser.add_argument("--profile", type=Path, help="run sgcache's mitmdump under cProfile, output in this dir")
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="also run the sgcache of another checkout (its addons/sgcache.py and cache/), on the "
                             "same replica, measured in turns with the others: before/after figures from one run")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", dest="sets",
                        help="a mitmproxy option of sgcache's mitmdump (repeatable), e.g. sgcache_access_log=off")
    args = parser.parse_args()

    tmp = run_dir("sgcache-bench-hit-")
    with bench_replica(args.db, tmp) as db_url:
        run(args, tmp, db_url)


def run(args: argparse.Namespace, tmp: Path, db_url: str) -> None:
    """The benchmark on the replica at ``db_url`` (made here)."""
    t0 = time.perf_counter()
    rig = Rig(tmp, db_url, populate_site=build_site, proxy=False, ingester=not args.no_ingester, poll_interval=1.0)
    with rig:
        print(f"site built and primed in {time.perf_counter() - t0:.1f} s; replica {db_url.split(':')[0]}")
        verbosity = os.environ.get("BENCH_VERBOSITY", "info")
        options = ([f"termlog_verbosity={verbosity}"] + (["sgcache_max_lag=0"] if args.no_ingester else [])
                   + args.sets)
        prefix: list[str] = []
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            prefix = [sys.executable, "-m", "cProfile", "-o", str(args.profile / "sgcache.prof")]
        proxy = rig.start_proxy(options, capture=False, prefix=prefix)
        floor = rig.start_proxy(["termlog_verbosity=info"], addon=FLOOR, workdir=tmp / "floor", capture=False)
        # the sgcache proxies measured: this checkout's, and the other checkout's (--compare)
        targets = {"sgcache": proxy}
        if args.compare:
            other = args.compare.resolve()
            targets["compare"] = rig.start_proxy(options, capture=False, workdir=tmp / "compare",
                                                 addon=other / "addons" / "sgcache.py", env={"PYTHONPATH": str(other)})
            print(f"compare: the sgcache of {other}")
        direct, via_floor = nodelay_after(rig.direct()), nodelay_after(rig.client(floor))
        query_set = queries(direct)
        via = {name: nodelay_after(rig.client(px)) for name, px in targets.items()}
        # SG accepts the credentials once (a pass), then every read of the set must be a hit equal to SG's
        all_hits(rig, query_set, direct, via)
        for _, call in query_set:
            call(via_floor)

        names = list(targets)
        print(f"\n{'query (p50 ms, client Nagle off)':<32} {'direct':>8} {'floor':>8}"
              + "".join(f" {n:>8} {'/floor':>6}" for n in names)
              + "   CPU-ms/call: floor" + "".join(f" {n:>8}" for n in names))
        floors, cpu_floor = [], []
        hits: dict[str, list[float]] = {n: [] for n in names}
        ratios: dict[str, list[float]] = {n: [] for n in names}
        cpu_hit: dict[str, list[float]] = {n: [] for n in names}
        for label, call in query_set:
            # the paths take turns, call by call: a busy moment of the machine falls on all of them
            (d, _), (f, fc), *measured = p50_side_by_side(
                [(lambda call=call: call(direct), None), (lambda call=call: call(via_floor), floor.proc.pid)]
                + [(lambda call=call, c=via[n]: call(c), targets[n].proc.pid) for n in names], args.calls)
            floors.append(f)
            cpu_floor.append(fc)
            for n, (h, hc) in zip(names, measured, strict=True):
                hits[n].append(h)
                ratios[n].append(h / f)
                cpu_hit[n].append(hc)
            print(f"{label:<32} {d:8.2f} {f:8.2f}" + "".join(f" {h:8.2f} {h / f:6.2f}" for h, _ in measured)
                  + f"                {fc:5.2f}" + "".join(f" {hc:8.2f}" for _, hc in measured))
        med = statistics.median
        print(f"{'median of the set':<32} {'':8} {med(floors):8.2f}"
              + "".join(f" {med(hits[n]):8.2f} {med(ratios[n]):6.2f}" for n in names)
              + f"                {med(cpu_floor):5.2f}" + "".join(f" {med(cpu_hit[n]):8.2f}" for n in names))

        # the real client as shipped (Nagle on)
        plain = rig.client(proxy)
        plain.find_one("Project", [])
        one = query_set[0][1]
        fifty = lambda sg: sg.find("Shot", [["sg_status_list", "in", ["ip", "wtg", "fin"]]],  # noqa: E731
                                   ["code", "sg_status_list", "sg_cut_in", "sg_cut_out", "sg_sequence", "project",
                                    "description", "sg_sequence.Sequence.code"], limit=50)
        print(f"\nreal client (Nagle on): one-row hit p50 {p50(lambda: one(plain), args.calls)[0]:.2f} ms, "
              f"50-row 8-field hit p50 {p50(lambda: fifty(plain), args.calls)[0]:.2f} ms")

        # a write (update of one field): direct, and through sgcache (sent by the proxy itself)
        shot_id = direct.find_one("Shot", [["code", "is", "sh0001"]])["id"]
        n = [0]

        def update(sg: Any) -> Any:
            n[0] += 1
            return sg.update("Shot", shot_id, {"description": f"write {n[0]}"})

        (wd, _), *written = p50_side_by_side(
            [(lambda: update(direct), None)]
            + [(lambda c=via[n]: update(c), targets[n].proc.pid) for n in names], max(40, args.calls // 4))
        print(f"write p50: direct {wd:.2f} ms" + "".join(
            f", through {n} {wp:.2f} ms (+{wp - wd:.2f} ms; {wc:.2f} CPU-ms/write)"
            for n, (wp, wc) in zip(names, written, strict=True)))

        # CPU of each mitmdump per call, and throughput: the two take turns in slices, so a slower
        # moment of a shared machine weighs on both alike
        calls = [call for _, call in query_set]
        # the writes' pending-write markers stand until the ingester is past them (reads of Shots pass
        # meanwhile): wait for hits again, else the first proxy to take a turn pays for all
        all_hits(rig, query_set, direct, via)
        turns = {"floor": floor, **targets}
        for threads in (4, 16):
            line = f"{threads:>2} client threads:"
            made = dict.fromkeys(turns, 0.0)
            cpu = dict.fromkeys(turns, 0.0)
            misses = dict.fromkeys(names, 0)
            sliced: dict[str, list[float]] = {n: [] for n in names}  # each slice's rate over the floor's
            for slice_no in range(args.rounds):
                order = list(turns.items())
                if slice_no % 2:  # the sgcache proxies swap places every other slice (no order favoured)
                    order = order[:1] + order[1:][::-1]
                rates = {}
                for name, px in order:
                    cpu0 = cpu_seconds(px.proc.pid)
                    before = client_reads(rig)
                    rates[name] = throughput(lambda px=px: rig.client(px), calls, threads, args.seconds / args.rounds)
                    cpu[name] += cpu_seconds(px.proc.pid) - cpu0
                    made[name] += rates[name] * args.seconds / args.rounds
                    if name in misses:
                        misses[name] += client_reads(rig) - before
                for n in names:
                    sliced[n].append(rates[n] / rates["floor"])
            for name in turns:
                line += (f"  {name} {made[name] / args.seconds:6.1f} calls/s "
                         f"({1000 * cpu[name] / made[name]:5.2f} CPU-ms/call)")
            # the spread of the slices' ratios says how far this machine's noise moves the total's
            print(line + "".join(f"  {n}: misses {misses[n]}, {made[n] / made['floor']:.2f}x floor "
                                 f"(slices {min(sliced[n]):.2f}-{max(sliced[n]):.2f})" for n in names))
        print(f"\nSIGTERM under load (16 clients): {sigterm_under_load(rig, proxy, calls, 16)}")
    if args.profile:
        print(f"profile: {args.profile / 'sgcache.prof'}")


def all_hits(rig: Rig, query_set: list[tuple[str, Callable[[Any], Any]]], direct: Any, via: dict[str, Any]) -> None:
    """Wait until every read of the set is a hit through each client of ``via``, and equal to SG's
    answer (a read passes while the replica's state is refreshed, or after a write until the
    ingester has it: tried again for up to 30 s)."""
    for label, call in query_set:
        expected = call(direct)
        for name, client in via.items():
            deadline = time.monotonic() + 30
            while True:
                before = client_reads(rig)
                assert call(client) == expected, f"{label}: {name}'s answer differs from SG's"
                if client_reads(rig) == before:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{label}: never a hit through {name}")
                time.sleep(0.05)


def client_reads(rig: Rig) -> int:
    """Reads SG served to the benchmark's clients (not the ingester's polls)."""
    return rig.site.count_by_script("read", SCRIPT)


if __name__ == "__main__":
    main()
