"""Shared fixtures: a fresh replica database per test (or module), on SQLite or PostgreSQL
(tests/databases.py), and the secret scan at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.private import url_password

from . import secretscan
from .databases import fresh_db_url, pg_base
from .fakesg import FakeSite


def run_secrets() -> dict[str, str | None]:
    """The distinctive secrets of this test run, by name."""
    from .rig import HUMAN_PASSWORD, KEY

    base = pg_base()
    return {"script key": KEY, "human password": HUMAN_PASSWORD,
            "database password": url_password(base) if base else None}


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_logs_or_answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run: no secret in any log file, captured answer or script output."""
    yield
    files = secretscan.run_files(tmp_path_factory.getbasetemp())
    found = secretscan.find_secrets(run_secrets(), files, secretscan.SCRIPT_OUTPUTS)
    assert not found, "secrets leaked:\n" + "\n".join(found[:50])


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
    return "postgresql" if pg_base() else "sqlite"


@pytest.fixture
def site() -> FakeSite:
    """The fake SG's basic schema with one script (modules may define their own ``site``)."""
    site = FakeSite.basic()
    site.add_script("pipeline", "s3cret")
    return site
