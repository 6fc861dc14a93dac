"""Settings shared by the scripts: the ``SGCACHE_*`` environment, overridable by flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .private import install_redaction, url_secrets

DEFAULT_DB = "sqlite:///sgcache.db"
DEFAULT_SCHEMA = "schema/basic.yml"

ENV = {
    "db": "SGCACHE_DB",
    "schema": "SGCACHE_SCHEMA",
    "site": "SGCACHE_SITE",
    "script_name": "SGCACHE_SCRIPT_NAME",
    "script_key": "SGCACHE_SCRIPT_KEY",
}


def add_common_args(parser: argparse.ArgumentParser, site: bool = True, db: bool = True) -> None:
    """Add ``--db``/``--schema`` and (with ``site``) ``--site``/``--script-name``/``--script-key``."""
    if db:
        parser.add_argument("--db", default=os.environ.get(ENV["db"], DEFAULT_DB),
                            help=f"replica database URL (env {ENV['db']}; default {DEFAULT_DB})")
        parser.add_argument("--schema", default=os.environ.get(ENV["schema"], DEFAULT_SCHEMA),
                            help=f"cached-subset schema YAML (env {ENV['schema']})")
    if site:
        parser.add_argument("--site", default=os.environ.get(ENV["site"]),
                            help=f"SG site URL, e.g. https://studio.shotgunstudio.com (env {ENV['site']})")
        parser.add_argument("--script-name", default=os.environ.get(ENV["script_name"]),
                            help=f"API script name (env {ENV['script_name']})")
        parser.add_argument("--script-key", default=os.environ.get(ENV["script_key"]),
                            help=f"API script key (env {ENV['script_key']})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


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
    """A ``shotgun_api3.Shotgun`` for the site named by the args; exits with a clear message if unset."""
    missing = [flag for flag, value in (("--site", args.site), ("--script-name", args.script_name),
                                        ("--script-key", args.script_key)) if not value]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} (or the SGCACHE_* environment)")
    import shotgun_api3

    return shotgun_api3.Shotgun(args.site, script_name=args.script_name, api_key=args.script_key,
                                connect=False)


def open_bound_store(url: str, schema: Any, site_url: str | None, **engine_kwargs: Any) -> Any:
    """Open the replica for a script, bound to ``site_url``; exits with one line naming both sites
    when the replica copies another site (checked before any table is created or migrated).

    Every script writes: the store is a writer's (on SQLite each transaction takes the write lock
    at BEGIN, so none fails upgrading a read lock while another process writes)."""
    from .replica.site import Site, SiteError, SiteMismatch, bind, check
    from .replica.store import Store

    try:
        site = Site.parse(site_url) if site_url else None
    except SiteError as exc:
        raise SystemExit(f"--site: {exc}") from None
    store = Store.open(url, schema, create=False, writer=True, **engine_kwargs)
    try:
        if site is not None:
            check(store, site)
        store.create()
        if site is not None:
            bind(store, site)
    except SiteMismatch as exc:
        store.dispose()
        raise SystemExit(f"sgcache: {exc}") from None
    except BaseException:
        store.dispose()
        raise
    return store
