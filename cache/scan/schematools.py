"""Schema tools behind ``sgcache-schema-dump`` and ``sgcache-schema-filter`` (``scripts/schema-*``).

``schema-dump`` reads a site's ``schema_read``/``schema_entity_read`` and writes it as the
YAML format of :mod:`cache.replica.schema`; ``schema-filter`` cuts such a file down to the fields a
rules file selects (see ``docs/schema-format.md``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..config import ConfigError, add_common_args, add_version, command, connect_site, setup_logging
from ..replica.schema import Schema, SchemaError, parse_rules
from ..shipped import basic_rules

log = logging.getLogger("sgcache.schematools")


# -- library -------------------------------------------------------------------------
def read_site_schema(sg: Any) -> Schema:
    """The whole schema of the site ``sg`` (a ``shotgun_api3.Shotgun``) talks to."""
    schema_read = sg.schema_read()
    entity_read = sg.schema_entity_read()
    log.info("site schema: %d entity types", len(schema_read))
    return Schema.from_schema_read(schema_read, entity_read)


def load_schema_text(text: str, source: str = "schema") -> Schema:
    """Parse schema YAML; every way it can be wrong is a :class:`SchemaError`."""
    try:
        return Schema.from_yaml(text)
    except SchemaError as exc:
        raise SchemaError(f"{source}: {exc}") from exc
    except (AttributeError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise SchemaError(f"{source}: not a schema file ({exc})") from exc


def read_text(path: str, what: str) -> str:
    """The text of ``path`` (``-`` for stdin); unreadable files are a :class:`SchemaError`."""
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"cannot read {what} {path}: {exc}") from exc


def filter_schema(schema: Schema, rules_text: str, brief: bool = False, source: str = "rules") -> Schema:
    """The subset of ``schema`` that the rules select (only type/links/values with ``brief``)."""
    try:
        rules = parse_rules(rules_text)
    except SchemaError as exc:
        raise SchemaError(f"{source}: {exc}") from exc
    subset = schema.filtered(rules)
    return subset.brief() if brief else subset


def write_output(text: str, path: str | None, stdout: TextIO) -> None:
    """Write ``text`` to ``path``, or to ``stdout`` when no path is given."""
    if path and path != "-":
        Path(path).write_text(text, encoding="utf-8")
    else:
        stdout.write(text)


# -- command lines -------------------------------------------------------------------
def dump_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgcache-schema-dump",
        description="Write the SG site's whole schema (schema_read + schema_entity_read) as sgcache "
        "schema YAML. See docs/schema-format.md.",
        epilog="Typical use: sgcache-schema-dump -o site.yml && sgcache-schema-filter site.yml > mine.yml",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write the YAML here (default: stdout)")
    add_common_args(parser, site=True, db=False)
    return parser


@command("sgcache-schema-dump")
def dump_main(argv: list[str] | None = None, stdout: TextIO | None = None) -> int:
    """``sgcache-schema-dump``: exit 0 on success, 1 when SG cannot be read, 2 on bad usage."""
    args = dump_parser().parse_args(argv)
    setup_logging(args.verbose, args)
    sg = connect_site(args)
    try:
        schema = read_site_schema(sg)
    except Exception as exc:  # noqa: BLE001 - any client or network error: one clear line
        log.error("cannot read the schema of %s: %s", args.site, exc)
        return 1
    try:
        write_output(schema.to_yaml(), args.output, stdout or sys.stdout)
    except OSError as exc:
        log.error("cannot write %s: %s", args.output, exc)
        return 1
    if args.output:
        log.info("wrote %d entity types to %s", len(schema.entities), args.output)
    return 0


def filter_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgcache-schema-filter",
        description="Write the subset of a schema YAML FILE that a rules file selects, as YAML, "
        "to stdout. A rules line is '+Type.field' or '-Type.field' (shell globs; '+Type' means "
        "'+Type.*'; '#' starts a comment); later lines win. A kept type always keeps 'id'.",
    )
    parser.add_argument("--rules", default=str(basic_rules()), metavar="RULES",
                        help="rules file (default: the project's schema/basic-filters.txt, which made "
                             "schema/basic.yml)")
    parser.add_argument("--brief", action="store_true",
                        help="keep only each field's type, links and values (drop labels, descriptions...)")
    parser.add_argument("file", metavar="FILE", help="schema YAML, as written by schema-dump ('-': stdin)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_version(parser)
    return parser


@command("sgcache-schema-filter")
def filter_main(argv: list[str] | None = None, stdout: TextIO | None = None) -> int:
    """``sgcache-schema-filter``: exit 0 on success, 2 on a bad rules or schema file."""
    args = filter_parser().parse_args(argv)
    setup_logging(args.verbose, args)
    try:
        rules_text = read_text(args.rules, "rules file")
    except SchemaError as exc:
        raise ConfigError("--rules", str(exc)) from None
    try:
        schema = load_schema_text(read_text(args.file, "schema file"), args.file)
    except SchemaError as exc:
        raise ConfigError("FILE", f"{exc} (give a schema YAML file written by sgcache-schema-dump)") from None
    try:
        subset = filter_schema(schema, rules_text, brief=args.brief, source=args.rules)
    except SchemaError as exc:
        raise ConfigError("--rules", f"{exc} (see docs/schema-format.md)") from None
    if not subset.entities:
        log.warning("the rules select no field of %s", args.file)
    (stdout or sys.stdout).write(subset.to_yaml())
    return 0
