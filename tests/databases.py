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
import threading
import time
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


#: Databases being dropped in the background (:func:`drop_database_later`), waited for at the
#: session's end (:func:`finish_drops`).
_drops: list[threading.Thread] = []
_drop_errors: list[str] = []


def drop_database_later(base: str, name: str) -> None:
    """Drop PostgreSQL database ``name`` on ``base``'s server in a thread of its own: a DROP DATABASE
    waits for a checkpoint (seconds on an idle server, most of a minute under the suite's load),
    which would hold the test's worker. :func:`finish_drops` waits for it before the session ends."""

    def drop() -> None:
        admin = sa.create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001 - reported by finish_drops
            _drop_errors.append(f"{name}: {exc}")
        finally:
            admin.dispose()

    thread = threading.Thread(target=drop, name=f"drop {name}", daemon=True)
    thread.start()
    _drops.append(thread)


def finish_drops(timeout: float = 600) -> list[str]:
    """Wait for the databases :func:`drop_database_later` is dropping: the names of those still
    being dropped after ``timeout`` seconds, and the errors of those that failed."""
    deadline = time.monotonic() + timeout
    left = []
    for thread in _drops:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread.name)
    left += _drop_errors
    _drops.clear()
    _drop_errors.clear()
    return left
