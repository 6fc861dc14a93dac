"""Prime the replica from SG and reconcile it by updated_at (sgcache-scan; see cache/scan/scanner.py).

Modes (one run may combine --full with --interval):

  --full            read every row (active and retired) of each selected type, one page per
                    transaction; rows the replica holds that SG no longer has are marked retired;
                    a type is marked primed (reads of it may be answered) when its scan completes.
                    Before the first prime, the newest EventLogEntry id is stored as the event
                    cursor, so sgcache-ingest-events resumes from there without a hole.
  --since ISO8601   read rows of primed types updated after that time (SG's clock, UTC unless
                    an offset is given), once.
  --interval SECS   repeat forever: read rows of primed types updated after their watermark
                    (the largest updated_at SG returned, minus --overlap), for writes made with
                    event generation off.
  (none of these)   one such watermark pass.

--projects limits types that have a project field (and Project itself) to those projects; such
a scan is partial, so those types are NOT marked primed and no row is marked retired for them.
Types without a project field are read whole and primed as usual.

Progress: --full first logs SG's count of each type's rows; then a bar per type on a terminal,
or a line (rows, rows/s, ETA) every --progress-every seconds in a log; --quiet for neither.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from ..config import (
    add_common_args,
    check_db_url,
    command,
    connect_site,
    load_schema,
    open_bound_store,
    select_cached_types,
    setup_logging,
)
from ..scan import DEFAULT_OVERLAP, PAGE_SIZE
from ..scan.progress import DEFAULT_LOG_EVERY
from ..wire import parse_when

if TYPE_CHECKING:
    from ..ops.metrics import ScanMetrics
    from ..scan.scanner import Scanner

log = logging.getLogger("sgcache.scan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sgcache-scan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--full", action="store_true", help="full scan: prime the selected types")
    parser.add_argument("--since", metavar="ISO8601",
                        help="reconcile rows updated after this time, e.g. 2024-05-01T12:00:00Z")
    parser.add_argument("--interval", type=float, metavar="SECONDS",
                        help="reconcile by watermark every SECONDS, forever (after --full/--since if given)")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, metavar="SECONDS",
                        help=f"re-read this much before each watermark (default {DEFAULT_OVERLAP:g})")
    parser.add_argument("--types", metavar="Shot,Task",
                        help="only these cached types (default: every type of the schema)")
    parser.add_argument("--projects", metavar="66,67",
                        help="only rows of these project ids (partial: those types are not marked primed)")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE,
                        help=f"rows per request and per transaction (default {PAGE_SIZE})")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics (passes done and failed, time of the last good pass) on "
                             "http://HOST:PORT/metrics, e.g. 127.0.0.1:9182; for --interval (default: off)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar on a terminal, no progress lines in a log")
    parser.add_argument("--progress-every", type=float, default=DEFAULT_LOG_EVERY, metavar="SECONDS",
                        help="when stderr is not a terminal (a service log), log each type's progress "
                             f"(rows, rows/s, ETA) every SECONDS (default {DEFAULT_LOG_EVERY:g})")
    args = parser.parse_args(argv)
    try:
        args.since_dt = parse_when(args.since) if args.since else None
        args.project_ids = [int(p) for p in args.projects.split(",") if p.strip()] if args.projects else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.page_size < 1 or (args.interval is not None and args.interval <= 0) or args.progress_every <= 0:
        parser.error("--page-size, --interval and --progress-every must be positive")
    return args


def run(args: argparse.Namespace, scanner: Scanner, types: list[str], metrics: ScanMetrics) -> None:
    """The passes the flags ask for."""
    if args.full:
        scanner.prime(types)
        metrics.done("full")
    if args.since_dt is not None:
        scanner.reconcile(types, since=args.since_dt)
        metrics.done("since")
    if not (args.full or args.since_dt or args.interval):
        scanner.reconcile(types, overlap=args.overlap)
        metrics.done("reconcile")
    if args.interval:
        loop(args, scanner, types, metrics)


def loop(args: argparse.Namespace, scanner: Scanner, types: list[str], metrics: ScanMetrics) -> None:
    """Reconcile every ``--interval`` seconds until interrupted; a failed pass is retried next time."""
    while True:
        started = time.monotonic()
        try:
            scanner.reconcile(types, overlap=args.overlap)
            metrics.done("reconcile")
        except Exception:  # noqa: BLE001 - SG or the database may be down for a while
            metrics.failed.inc()
            log.exception("reconcile pass failed; retrying in %g s", args.interval)
        time.sleep(max(0.0, args.interval - (time.monotonic() - started)))


@command("sgcache-scan")
def main(argv: list[str] | None = None) -> int:
    """``sgcache-scan``: exit 0, 1 when a pass failed, 2 on a configuration error, 130 when interrupted."""
    args = parse_args(argv)
    setup_logging(args.verbose, args)
    schema = load_schema(args.schema)
    check_db_url(args.db)
    types = select_cached_types(schema, args.types)
    sg: Any = connect_site(args)
    store = open_bound_store(args.db, schema, args.site)
    progress = "off" if args.quiet else ("bar" if sys.stderr.isatty() else "log")
    from ..scan.scanner import Scanner  # here: --help and --version need not load SQLAlchemy

    scanner = Scanner(store, sg, page_size=args.page_size, projects=args.project_ids,
                      progress=progress, log_every=args.progress_every)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from ..ops.metrics import ScanMetrics, serve

    metrics = ScanMetrics()
    try:
        if args.metrics:
            serve(args.metrics, metrics.registry, "scanner")
        run(args, scanner, types, metrics)
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, the traceback only with -v
        log.error("scan failed: %s", exc, exc_info=args.verbose)
        return 1
    finally:
        store.dispose()
    return 0
