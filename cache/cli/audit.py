"""The audit's findings in the replica: the newest disagreements, the rules switched off, and
switching them on again (docs/operations.md, "Audit").

    sgcache-audit                  # rules switched off, and the newest disagreements
    sgcache-audit --show 3         # the full record (request, both answers) of the newest 3
    sgcache-audit --clear          # switch every rule on again (or name them: --clear sort range)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..config import add_common_args, check_db_url, command, load_schema, open_bound_store, setup_logging

log = logging.getLogger("sgcache.audit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sgcache-audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, site=False)
    parser.add_argument("--clear", nargs="*", metavar="RULE",
                        help="switch these rules on again (none named: all of them)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the newest N disagreements whole, as JSON lines")
    return parser.parse_args(argv)


@command("sgcache-audit")
def main(argv: list[str] | None = None) -> int:
    """``sgcache-audit``: exit 0, 2 on a configuration error."""
    args = parse_args(argv)
    setup_logging(args.verbose, args)
    import sqlalchemy as sa  # here: --help and --version need not load SQLAlchemy

    from ..audit import table

    check_db_url(args.db)
    store = open_bound_store(args.db, load_schema(args.schema), None)
    try:
        table.create(store.write_engine)
        with store.write_engine.begin() as conn:
            if args.clear is not None:
                n = table.clear(conn, args.clear or None)
                log.info("switched %d rule(s) on again", n)
                return 0
            off = conn.execute(sa.select(table.disabled)).mappings().all()
            print("rules switched off: " + (", ".join(f"{r['rule']} (since {r['at']}, {r['entity_type']})"
                                                      for r in off) or "none"))
            for at, entity_type, rules in table.latest(conn, 10):
                print(f"{at} {entity_type}: {rules}")
            if args.show > 0:
                rows = conn.execute(sa.select(table.audit).order_by(table.audit.c.id.desc()).limit(args.show))
                for row in rows.mappings():
                    sys.stdout.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    finally:
        store.dispose()
    return 0
