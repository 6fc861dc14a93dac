"""Shared fixtures: a fresh replica database per test, on SQLite or PostgreSQL.

``SGCACHE_TEST_DB`` picks the backend: unset or ``sqlite`` for a temporary SQLite
file, or a PostgreSQL URL (``postgresql://postgres@127.0.0.1:5432/test``). On
PostgreSQL each test gets its own schema (dropped afterwards) through the URL's
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

import pytest
import sqlalchemy as sa

from cache.dialect import normalize_url
from cache.private import url_password

from . import secretscan
from .fakesg import FakeSite

REPO = Path(__file__).resolve().parent.parent
BASIC_SCHEMA = REPO / "schema" / "basic.yml"
#: Put into a PostgreSQL test URL that has no password (a distinctive value the secret scan looks for).
DB_PASSWORD = "dbpw-9e2c5a71-NeverLogMe"


def _with_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None or not parts.hostname:
        return url
    user = parts.username or "postgres"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{DB_PASSWORD}@{parts.netloc.rpartition('@')[2]}"))


def _pg_base() -> str | None:
    value = os.environ.get("SGCACHE_TEST_DB", "sqlite")
    return None if value in ("", "sqlite") else _with_password(value)


def run_secrets() -> dict[str, str | None]:
    """The distinctive secrets of this test run, by name."""
    from .e2e import HUMAN_PASSWORD, KEY

    base = _pg_base()
    return {"script key": KEY, "human password": HUMAN_PASSWORD,
            "database password": url_password(base) if base else None}


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_logs_or_answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run: no secret in any log file, captured answer or script output."""
    yield
    files = secretscan.run_files(tmp_path_factory.getbasetemp())
    found = secretscan.find_secrets(run_secrets(), files, secretscan.SCRIPT_OUTPUTS)
    assert not found, "secrets leaked:\n" + "\n".join(found[:50])


@contextlib.contextmanager
def fresh_db_url(directory: Path) -> Iterator[str]:
    """A database URL no other test uses, cleaned up afterwards."""
    base = _pg_base()
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


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """A database URL for this test alone."""
    with fresh_db_url(tmp_path) as url:
        yield url


@pytest.fixture(scope="module")
def module_db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database URL shared by the tests of one module (for expensive set-ups)."""
    with fresh_db_url(tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture
def backend() -> str:
    return "postgresql" if _pg_base() else "sqlite"


@pytest.fixture
def site() -> FakeSite:
    """The fake SG's basic schema with one script (modules may define their own ``site``)."""
    site = FakeSite.basic()
    site.add_script("pipeline", "s3cret")
    return site
