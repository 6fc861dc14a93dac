"""Settings shared by the commands: the ``SGCACHE_*`` environment, overridable by flags.

A configuration error (a bad ``--db`` URL, a missing schema file, a bad site URL, missing
credentials, a replica of another site) is a :class:`ConfigError`: the command prints one line
naming the option and the fix and exits 2 (:func:`command`). Only an outage of a correctly
configured database or site is something else.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from . import package_version
from .private import install_redaction, redact, url_secrets
from .shipped import basic_schema

DEFAULT_DB = "sqlite:///sgcache.db"
#: Resolved from the package (a checkout's or an installed ``schema/basic.yml``), never the cwd.
DEFAULT_SCHEMA = str(basic_schema())
#: Exit status of a configuration error.
CONFIG_ERROR = 2

ENV = {
    "db": "SGCACHE_DB",
    "schema": "SGCACHE_SCHEMA",
    "site": "SGCACHE_SITE",
    "script_name": "SGCACHE_SCRIPT_NAME",
    "script_key": "SGCACHE_SCRIPT_KEY",
}


class ConfigError(Exception):
    """A setting that cannot work as given: ``option`` names it, the message says what to do."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


class Unavailable(Exception):
    """A correctly named replica that cannot be opened now (database down, refused, no such
    database): the command logs one line (a traceback with ``-v``) and exits 1."""


def command(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main``: a :class:`ConfigError` becomes one line on stderr
    (``prog: error: --db (SGCACHE_DB): ...``) and exit status 2; :class:`Unavailable` one log
    line and exit status 1."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except ConfigError as exc:
                sys.stderr.write(f"{prog}: error: {exc}\n")
                return CONFIG_ERROR
            except Unavailable as exc:
                log = logging.getLogger("sgcache")
                log.error("%s", exc, exc_info=exc.__cause__ if log.isEnabledFor(logging.DEBUG) else None)
                return 1
        return run

    return wrap


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the installed sgcache's version."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (sgcache) {package_version()}")


def option_name(flag: str) -> str:
    """A flag with the environment variable it defaults from: ``--db (SGCACHE_DB)``."""
    env = ENV.get(flag.lstrip("-").replace("-", "_"))
    return f"{flag} ({env})" if env else flag


def check_db_url(url: str) -> None:
    """ConfigError naming ``--db`` when the URL cannot name a replica sgcache runs on."""
    from .replica.dialect import url_problem

    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(option_name("--db"), problem)


def load_schema(path: str) -> Any:
    """The schema file ``path``; ConfigError naming ``--schema`` when it cannot be used."""
    from .replica.schema import Schema, SchemaError

    try:
        return Schema.load(path)
    except SchemaError as exc:
        raise ConfigError(option_name("--schema"), f"{exc} (give a schema YAML file; the default is "
                                                   f"{DEFAULT_SCHEMA})") from None


def check_site_url(url: str) -> Any:
    """The :class:`~cache.replica.site.Site` of ``url``; ConfigError naming ``--site`` when it names
    none (the message never quotes a password the URL carries)."""
    from .replica.site import Site, SiteError

    try:
        return Site.parse(url)
    except SiteError as exc:
        raise ConfigError(option_name("--site"), redact(f"{exc} (e.g. https://studio.shotgunstudio.com)",
                                                        url_secrets(url))) from None


def add_common_args(parser: argparse.ArgumentParser, site: bool = True, db: bool = True) -> None:
    """Add ``--db``/``--schema`` and (with ``site``) ``--site``/``--script-name``/``--script-key``;
    always ``-v`` and ``--version``."""
    if db:
        parser.add_argument("--db", default=os.environ.get(ENV["db"], DEFAULT_DB),
                            help=f"replica database URL (env {ENV['db']}; default {DEFAULT_DB})")
        parser.add_argument("--schema", default=os.environ.get(ENV["schema"], DEFAULT_SCHEMA),
                            help=f"cached-subset schema YAML (env {ENV['schema']}; default: the shipped "
                                 "schema/basic.yml)")
    if site:
        parser.add_argument("--site", default=os.environ.get(ENV["site"]),
                            help=f"SG site URL, e.g. https://studio.shotgunstudio.com (env {ENV['site']})")
        parser.add_argument("--script-name", default=os.environ.get(ENV["script_name"]),
                            help=f"API script name (env {ENV['script_name']})")
        parser.add_argument("--script-key", default=os.environ.get(ENV["script_key"]),
                            help=f"API script key (env {ENV['script_key']})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_version(parser)


def setup_logging(verbose: bool, args: Any = None) -> None:
    """Log to stderr; with the parsed ``args``, the script key and the database password given
    there are masked in every line (also in tracebacks and in errors quoted from libraries)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args is not None:
        install_redaction(secrets_of(args))
        sys.excepthook = _log_uncaught  # an uncaught traceback goes through the masking too


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    logging.getLogger("sgcache").critical("uncaught %s", exc_type.__name__, exc_info=(exc_type, exc, tb))


def secrets_of(args: Any) -> list[str | None]:
    """The secrets among parsed script arguments: the script key and the passwords in the
    database and site URLs."""
    return [getattr(args, "script_key", None), *url_secrets(getattr(args, "db", None) or ""),
            *url_secrets(getattr(args, "site", None) or "")]


def connect_site(args: Any) -> Any:
    """A ``shotgun_api3.Shotgun`` for the site named by the args; ConfigError when one is missing
    or the site URL is not one."""
    missing = [flag for flag, value in (("--site", args.site), ("--script-name", args.script_name),
                                        ("--script-key", args.script_key)) if not value]
    if missing:
        raise ConfigError(", ".join(option_name(flag) for flag in missing),
                          "missing; give the SG site and the API script that reads it")
    check_site_url(args.site)
    # datetimes as naive UTC, as SG sends them: the default turns them into the host's local time,
    # which is ambiguous in the hour a daylight-saving change repeats (back to UTC an hour off)
    return wire_client_class()(args.site, script_name=args.script_name, api_key=args.script_key,
                               connect=False, convert_datetimes_to_utc=False)


def wire_client_class() -> type:
    """``shotgun_api3.Shotgun`` giving the records as SG sent them: the library's own fix-ups
    (``&lt;`` turned back into ``<`` at the top level of each record, where SG's input
    sanitization stored it so; ``local_path`` and a ``file://`` url added to local file links) are
    for a tool, not for the replica, which must hold what SG sends (the proxy serves it to clients,
    whose own library applies the fix-ups then; sorts and filters compare SG's stored text)."""
    import shotgun_api3

    class WireShotgun(shotgun_api3.Shotgun):
        def _parse_records(self, records: Any) -> list[Any]:
            if not records:
                return []
            return list(records) if isinstance(records, list | tuple) else [records]

    return WireShotgun


def open_bound_store(url: str, schema: Any, site_url: str | None, **engine_kwargs: Any) -> Any:
    """Open the replica for a script, bound to ``site_url``; ConfigError for a bad URL, and (naming
    both sites) when the replica copies another site (checked before any table is created or migrated).

    Every script writes: the store is a writer's (on SQLite each transaction takes the write lock
    at BEGIN, so none fails upgrading a read lock while another process writes)."""
    import sqlalchemy as sa

    from .replica.site import SiteMismatch, bind, check
    from .replica.store import Store

    check_db_url(url)
    site = check_site_url(site_url) if site_url else None
    store = None
    try:
        store = Store.open(url, schema, create=False, writer=True, **engine_kwargs)
        if site is not None:
            check(store, site)
        store.create()
        if site is not None:
            bind(store, site)
    except SiteMismatch as exc:
        store.dispose()
        raise ConfigError(option_name("--site"), f"{exc}") from None
    except sa.exc.DBAPIError as exc:
        if store is not None:
            store.dispose()
        raise unavailable(url, exc) from exc
    except BaseException:
        if store is not None:
            store.dispose()
        raise
    return store


def unavailable(url: str, exc: Exception) -> Unavailable:
    """The one-line :class:`Unavailable` for a database error met opening the replica at ``url``
    (its first line; the URL without its password)."""
    from .private import safe_url

    text = str(getattr(exc, "orig", None) or exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return Unavailable(f"cannot open the replica {safe_url(url)}: {first}")


def select_cached_types(schema: Any, types: str | None) -> list[str]:
    """The types named by ``--types`` (all cached types by default); ConfigError naming ``--types``
    for a type the schema does not cache."""
    from .replica.schema import SchemaError, select_types

    try:
        return select_types(schema, types)
    except SchemaError as exc:
        raise ConfigError("--types", str(exc)) from None
