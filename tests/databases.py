"""Test databases: a fresh SQLite file or PostgreSQL schema per test (or per module).

``SGCACHE_TEST_DB`` picks the backend: unset or ``sqlite`` for a temporary SQLite
file, or a PostgreSQL URL (``postgresql://postgres@127.0.0.1:5432/test``). On
PostgreSQL each database is a schema of its own (dropped afterwards) named through the URL's
``search_path`` option, so subprocesses given the URL see the same tables. A PostgreSQL URL
without a password gets ``DB_PASSWORD`` (trust authentication ignores it), so the secret scan
at the end of the session (tests/secretscan.py) can check no log shows it.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from cache.replica.dialect import normalize_url

#: Put into a PostgreSQL test URL that has no password (a distinctive value the secret scan looks for).
DB_PASSWORD = "dbpw-9e2c5a71-NeverLogMe"


def _with_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None or not parts.hostname:
        return url
    user = parts.username or "postgres"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{DB_PASSWORD}@{parts.netloc.rpartition('@')[2]}"))


def pg_base() -> str | None:
    """The PostgreSQL URL the tests run on (with a password), or None on SQLite."""
    value = os.environ.get("SGCACHE_TEST_DB", "sqlite")
    return None if value in ("", "sqlite") else _with_password(value)


@contextlib.contextmanager
def fresh_db_url(directory: Path) -> Iterator[str]:
    """A database URL no other test uses, cleaned up afterwards."""
    base = pg_base()
    if base is None:
        yield f"sqlite:///{directory / 'replica.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()
