"""Memory benchmark: the proxy's resident memory over many distinct reads and a few large bodies,
and how fast it exits on SIGTERM under load (issue 11, target 6).

    python -m benchmarks.bench_memory [--reads 100000] [--threads 4] [--big 3] [--big-mb 50] [--db URL]
                                      [--set OPTION=VALUE ...]

A fake SG site (tests/rig.py's small studio), primed, one sgcache mitmdump (no ingester:
``sgcache_max_lag=0``). ``--reads`` distinct reads (each a new request: a new plan), every one a
hit, from ``--threads`` clients; the mitmdump's RSS (``/proc/<pid>/status``) is printed every tenth
of them. Then ``--big`` times: a write whose body holds a ``--big-mb`` MB text field, the same
field read back through the proxy, and a small write over it; RSS after each, and after all.
Last, 16 clients read and the mitmdump gets SIGTERM: the seconds until it exited, and how many
calls failed. ``--set`` passes mitmdump options (e.g. ``--set sgcache_plan_cache=100``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.hitset import sigterm_under_load  # noqa: E402
from benchmarks.support import run_dir  # noqa: E402
from tests.rig import Rig  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def distinct_reads(rig: Rig, proxy: Any, reads: int, threads: int) -> None:
    """``reads`` distinct reads (each a new request JSON), printing RSS every tenth of them."""
    clients = [rig.client(proxy) for _ in range(threads)]
    for sg in clients:
        sg.find_one("Project", [])  # SG accepts the credentials once; hits from then on
    hits_before = rig.reads()
    done = [0]
    lock = threading.Lock()
    step = max(1, reads // 10)

    def work(k: int) -> None:
        sg = clients[k]
        for i in range(k, reads, threads):
            sg.find("Shot", [["sg_cut_in", "greater_than", i - 1_000_000]], ["code", "sg_cut_in"], limit=5)
            with lock:
                done[0] += 1
                if done[0] % step == 0:
                    print(f"  {done[0]:>7} distinct reads: RSS {rss_mb(proxy.proc.pid):7.1f} MB", flush=True)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"  {reads} reads in {time.perf_counter() - t0:.1f} s; SG served {rig.reads() - hits_before} of them")


def big_bodies(rig: Rig, proxy: Any, times: int, mb: int) -> None:
    """Writes and reads of a ``mb`` MB text field through the proxy, RSS after each."""
    sg = rig.client(proxy)
    shot = sg.find_one("Shot", [], ["id"])
    big = "x" * (mb * 1024 * 1024)
    for n in range(times):
        sg.update("Shot", shot["id"], {"description": big})
        after_write = rss_mb(proxy.proc.pid)
        got = sg.find_one("Shot", [["id", "is", shot["id"]]], ["description"])
        if got["description"] != big:
            print(f"  WRONG ANSWER: the {mb} MB field read back as {str(got['description'])[:40]!r}")
        after_read = rss_mb(proxy.proc.pid)
        sg.update("Shot", shot["id"], {"description": f"small {n}"})
        print(f"  big body {n + 1}: RSS {after_write:7.1f} MB after the {mb} MB write, {after_read:7.1f} MB "
              f"after reading it, {rss_mb(proxy.proc.pid):7.1f} MB after a small write", flush=True)
    time.sleep(2.0)
    print(f"  2 s after the large bodies: RSS {rss_mb(proxy.proc.pid):.1f} MB")


def sigterm_under_load_reads(rig: Rig, proxy: Any, threads: int = 16) -> str:
    """SIGTERM while ``threads`` clients read (benchmarks/hitset.py's sigterm_under_load)."""
    calls = [lambda sg: sg.find_one("Project", [])] + [
        lambda sg, n=n: sg.find("Shot", [["sg_cut_in", "greater_than", n]], ["code"]) for n in range(50)]
    return sigterm_under_load(rig, proxy, calls, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=100_000, help="distinct reads")
    parser.add_argument("--threads", type=int, default=4, help="client threads for the distinct reads")
    parser.add_argument("--big", type=int, default=3, help="large bodies (write, read back)")
    parser.add_argument("--big-mb", type=int, default=50, help="size of a large body, MB")
    parser.add_argument("--db", help="replica URL (default: a temporary SQLite file)")
    parser.add_argument("--set", action="append", default=[], dest="options", help="a mitmdump option")
    args = parser.parse_args()

    tmp = run_dir("sgcache-bench-memory-")
    db_url = args.db or f"sqlite:///{tmp / 'replica.db'}"
    with Rig(tmp, db_url, proxy=False) as rig:
        proxy = rig.start_proxy(["sgcache_max_lag=0", "termlog_verbosity=info", *args.options], capture=False)
        print(f"replica {db_url.split(':')[0]}; sgcache at {REPO}; RSS at start {rss_mb(proxy.proc.pid):.1f} MB")
        distinct_reads(rig, proxy, args.reads, args.threads)
        if args.big:
            big_bodies(rig, proxy, args.big, args.big_mb)
        print(f"SIGTERM under load (16 clients): {sigterm_under_load_reads(rig, proxy)}")


if __name__ == "__main__":
    main()
