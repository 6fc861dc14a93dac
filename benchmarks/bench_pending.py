"""Cost of the pending-write check that every read makes (one query on ``sgcache_pending``).

    python -m benchmarks.bench_pending [--db URL] [--calls 2000] [--markers 0]

Times the read engine answering a small page of Shots with the check and without it, and
the check alone on an open connection, with an empty marker table or N markers on another type. Prints microseconds per read; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.support import run_dir  # noqa: E402
from cache.proxy.service import CacheService  # noqa: E402
from cache.read import ReplicaState  # noqa: E402
from cache.replica import pending  # noqa: E402

PARAMS = {"type": "Shot", "return_fields": ["code", "sg_status_list", "sg_sequence"],
          "filters": {"logical_operator": "and", "conditions": [{"path": "code", "relation": "is", "values": ["sh1"]}]},
          "paging": {"entities_per_page": 50, "current_page": 1}, "return_only": "active"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=None, help="replica URL (default: a temporary SQLite file)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--markers", type=int, default=0, help="markers standing on other types")
    args = parser.parse_args()
    tmp = run_dir("sgcache-bench-pending-")
    url = args.db or f"sqlite:///{tmp / 'bench.db'}"
    svc = CacheService(url, REPO / "schema" / "basic.yml", max_lag=0)
    store = svc.store
    with store.engine.begin() as conn:
        conn.execute(store.pending.delete())
        store.write_entities(conn, "Shot", [{f: None for f in store.schema.entities["Shot"].fields} | {"id": 1,
                             "code": "sh1"}], "scan", complete=True)
        for t in store.schema.entities:
            store.mark_primed(conn, t)
        pending.mark(conn, store.pending, [("Version", f"f{i}") for i in range(args.markers)])

    def timed(fn: object) -> float:
        samples = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e6

    def read(check: bool) -> None:
        with store.engine.connect() as conn:
            replica_state: ReplicaState = svc._replica_state(conn)
            svc.reader.read(conn, PARAMS, replica_state, check_pending=check)

    with_check = timed(lambda: read(True))
    bare = timed(lambda: read(False))
    with store.engine.connect() as conn:
        alone = timed(lambda: pending.check_read(conn, store.pending, {("Shot", "*"), ("Shot", "code")}))
    print(f"{store.dialect}, {args.markers} markers: read {with_check:.0f} us with the check, "
          f"{bare:.0f} us without; the check alone {alone:.0f} us (median of {args.calls})")
    svc.close()
    with store.engine.begin() as conn:
        conn.execute(store.pending.delete())


if __name__ == "__main__":
    main()
