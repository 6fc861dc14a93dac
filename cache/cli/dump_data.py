"""Write the replica's rows as JSON lines in SG's wire format (see cache/scan/dumpformat.py).

One entity per line (type, id, _retired, every cached field; links with type, id and name), after
a header line naming the site, the schema's digests, the event cursor and, per type, whether the
dump is complete for it. The replica is read in one snapshot, page by page; it is never written.
Nothing is asked of SG.

--types and --projects choose what to dump (default: every cached type, every row); types with a
project field (and Project itself) are then dumped for those projects only, and such a dump is not
complete for them (scripts/load-data will not mark them primed).

--redact replaces text for a bug report: every value of a text field; in url fields every string
but link_type and content_type; in serializable fields every string (keys kept); every link's
name. A token is "~" and 16 hex digits of an HMAC of the value under a key made for the run:
equal values give equal tokens within one dump, and tokens differ between dumps. Numbers, dates,
checkboxes, list and status values, colours, uuids, tags, entity types and ids are kept, and so is
the site's URL in the header.

The output (-o, default stdout) is a new file of mode 0600 (it holds the site's data), gzip
compressed when its name ends in .gz.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import (
    ConfigError,
    add_common_args,
    check_db_url,
    command,
    load_schema,
    select_cached_types,
    setup_logging,
    unavailable,
)
from ..scan.dump import PAGE_SIZE, Dumper, open_replica
from ..scan.dumpformat import DumpError, Redactor, open_output

log = logging.getLogger("sgcache.dump")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sgcache-dump-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, site=False)
    parser.add_argument("-o", "--output", default="-", metavar="FILE",
                        help="the dump file (default: stdout; FILE.gz is compressed)")
    parser.add_argument("--types", metavar="Shot,Task",
                        help="only these cached types (default: every type of the schema)")
    parser.add_argument("--projects", metavar="66,67",
                        help="only rows of these project ids (types with a project field, and Project)")
    parser.add_argument("--redact", action="store_true", help="replace text values by tokens (see above)")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE,
                        help=f"rows per query (default {PAGE_SIZE})")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar (it is also off when stderr is not a terminal)")
    args = parser.parse_args(argv)
    try:
        args.project_ids = [int(p) for p in args.projects.split(",") if p.strip()] if args.projects else None
    except ValueError as exc:
        parser.error(f"--projects: {exc}")
    if args.page_size < 1:
        parser.error("--page-size must be positive")
    return args


@command("sgcache-dump-data")
def main(argv: list[str] | None = None) -> int:
    """``sgcache-dump-data``: exit 0, 1 when the dump failed, 2 on a configuration error, 130 when interrupted."""
    args = parse_args(argv)
    setup_logging(args.verbose, args)
    schema = load_schema(args.schema)
    check_db_url(args.db)
    types = select_cached_types(schema, args.types)
    import sqlalchemy as sa  # here: --help and --version need not load SQLAlchemy

    try:
        store = open_replica(args.db, schema)
    except DumpError as exc:  # no replica there
        raise ConfigError("--db", str(exc)) from None
    except sa.exc.DBAPIError as exc:
        raise unavailable(args.db, exc) from exc
    dumper = Dumper(store, types=types, projects=args.project_ids,
                    redactor=Redactor() if args.redact else None, page_size=args.page_size,
                    progress=not args.quiet and sys.stderr.isatty())
    try:
        with open_output(args.output) as out:
            dumper.dump(out)
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except (DumpError, OSError) as exc:
        log.error("dump failed: %s", exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - one clear line, the traceback only with -v
        log.error("dump failed: %s", exc, exc_info=args.verbose)
        return 1
    finally:
        store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
