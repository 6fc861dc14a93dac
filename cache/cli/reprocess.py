"""Apply events stored in sgcache_events again, in id order (e.g. --retirement after a fix).

Re-applying is idempotent. Entities that need a fresh read from SG are put in the fetch
queue; they are read here when the site is configured, otherwise by the ingester.

It takes the ingester's leader lock first: while an ingester leads it refuses (exit 3);
stop the ingester, reprocess, start it again.
"""

from __future__ import annotations

import argparse
import logging

from ..config import (
    add_common_args,
    check_db_url,
    command,
    connect_site,
    load_schema,
    open_bound_store,
    setup_logging,
)

log = logging.getLogger("sgcache.reprocess")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sgcache-reprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--retirement", action="store_true",
                        help="only retirements and revivals (and retirement_date changes)")
    parser.add_argument("--from-id", type=int, default=0, help="first event id to replay")
    parser.add_argument("--types", default="", help="comma-separated entity types (default: all)")
    parser.add_argument("--no-fetch", action="store_true",
                        help="leave queued fetches to the ingester even when the site is configured")
    return parser.parse_args(argv)


@command("sgcache-reprocess")
def main(argv: list[str] | None = None) -> int:
    """``sgcache-reprocess``: exit 0, 2 on a configuration error, 3 when an ingester leads already."""
    args = parse_args(argv)
    setup_logging(args.verbose, args)
    from ..ingest import Ingester, LockHeld, replay  # here: --help and --version need not load SQLAlchemy

    schema = load_schema(args.schema)
    check_db_url(args.db)
    sg = None
    if args.site and args.script_name and args.script_key and not args.no_fetch:
        sg = connect_site(args)
    store = open_bound_store(args.db, schema, args.site)
    ingester = Ingester(store, sg)
    try:
        try:
            leader = ingester.become_leader(wait=False)
        except LockHeld as exc:
            leader = False
            log.error("%s", exc)
        if not leader:
            log.error("an ingester leads this replica: stop it before reprocessing")
            return 3
        types = {t.strip() for t in args.types.split(",") if t.strip()} or None
        count = replay(store, ingester, from_id=args.from_id, types=types, retirement=args.retirement)
        log.info("replayed %d stored events", count)
        if sg is not None:
            log.info("re-read %d queued entities from SG", ingester.process_fetch_queue())
        else:
            log.info("queued fetches (if any) are left to sgcache-ingest-events")
    finally:
        ingester.close()
        store.dispose()
    return 0
