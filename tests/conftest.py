"""Shared fixtures: a fresh replica database per test, on SQLite or PostgreSQL.

``SGCACHE_TEST_DB`` picks the backend: unset or ``sqlite`` for a temporary SQLite
file, or a PostgreSQL URL (``postgresql://postgres@127.0.0.1:5432/test``). On
PostgreSQL each test gets its own schema (dropped afterwards) through the URL's
``search_path`` option, so subprocesses given the URL see the same tables.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from cache.store import normalize_url

REPO = Path(__file__).resolve().parent.parent
BASIC_SCHEMA = REPO / "schema" / "basic.yml"


def _pg_base() -> str | None:
    value = os.environ.get("SGCACHE_TEST_DB", "sqlite")
    return None if value in ("", "sqlite") else value


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
