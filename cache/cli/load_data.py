"""Load a file written by scripts/dump-data into a replica (see cache/scan/load.py).

Rows, links and the entity registry are written as scripts/scan writes them, one page per
transaction. Nothing is asked of SG.

--complete               mark primed (reads of them may be answered) every type the file says it is
                         complete for (dumped whole from a replica that had it primed).
--complete-types Shot,Task
                         mark these types primed; the file must be complete for each.
A type is not primed anyway when the replica holds rows of it that the file lacks. Without either
flag no type is primed: the rows are there for scripts/scan to complete.

The replica must be new or bound to the file's site (the header names it); a replica bound to
another site, a schema that defines a type otherwise than the file, and a type already primed in
the replica are refused. When the replica has no event cursor, it takes the file's, so
scripts/ingest-events resumes where the dumped replica stood.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..config import (
    ENV,
    ConfigError,
    Unavailable,
    add_common_args,
    check_db_url,
    check_site_url,
    command,
    load_schema,
    open_bound_store,
    setup_logging,
)
from ..replica.site import SiteError, SiteMismatch, normalise
from ..scan.dumpformat import DumpError, open_input, read_header
from ..scan.load import PAGE_SIZE, Loader

log = logging.getLogger("sgcache.load")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sgcache-load-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, site=False)
    parser.add_argument("--site", default=os.environ.get(ENV["site"]),
                        help=f"refuse a file of another site than this one (env {ENV['site']})")
    parser.add_argument("file", help="the dump (- for stdin; FILE.gz is read through gzip)")
    complete = parser.add_mutually_exclusive_group()
    complete.add_argument("--complete", action="store_true",
                          help="mark primed every type the file is complete for")
    complete.add_argument("--complete-types", metavar="Shot,Task",
                          help="mark these types primed (the file must be complete for each)")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE,
                        help=f"rows per transaction (default {PAGE_SIZE})")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar (it is also off when stderr is not a terminal)")
    args = parser.parse_args(argv)
    if args.page_size < 1:
        parser.error("--page-size must be positive")
    if args.complete_types is not None:
        args.prime = [t.strip() for t in args.complete_types.split(",") if t.strip()]
        if not args.prime:
            parser.error("--complete-types: name at least one type")
    else:
        args.prime = args.complete
    return args


@command("sgcache-load-data")
def main(argv: list[str] | None = None) -> int:
    """``sgcache-load-data``: exit 0, 1 when the load failed, 2 on a configuration error, 130 when interrupted."""
    args = parse_args(argv)
    setup_logging(args.verbose, args)
    schema = load_schema(args.schema)
    check_db_url(args.db)
    if args.site:
        check_site_url(args.site)
    try:
        with open_input(args.file) as stream:
            header = read_header(stream)
            site = header.get("site")
            if args.site and site and normalise(args.site) != site:
                raise DumpError(f"the file copies {site}, not the configured site {normalise(args.site)}")
            store = open_bound_store(args.db, schema, site or args.site)
            loader = Loader(store, complete=args.prime, page_size=args.page_size,
                            progress=not args.quiet and sys.stderr.isatty())
            try:
                loader.load(stream, header)
            finally:
                store.dispose()
    except (ConfigError, Unavailable):
        raise  # one line and exit 2 (1) by @command
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except (DumpError, SiteError, SiteMismatch, OSError, UnicodeDecodeError) as exc:
        log.error("load failed: %s", exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - one clear line, the traceback only with -v
        log.error("load failed: %s", exc, exc_info=args.verbose)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
